"""The GPU run's one table: every training variant of ``train_vs_trl.py`` and the precompute ratios of
``precompute_vs_forward.py``, from their ``--output`` JSON files (``bench/gpu.sh`` writes them under ``$OUT``).

    python3 bench/gpu_table.py OUT/train_vs_trl.json OUT/precompute_vs_forward.json
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

LABELS = {
    "trl_gc0": "TRL DPOTrainer",
    "trl_gc1": "TRL DPOTrainer, gradient checkpointing",
    "mrpo_k1_padded": "mrpo padded",
    "mrpo_k1_packed": "mrpo packed (flex_attention)",
    "mrpo_k4_packed": "mrpo packed, K=4",
    "mrpo_k1_shared": "mrpo prefix-shared",
    "mrpo_k1_packed_compiled": "mrpo packed, compiled, bucketed",
    "mrpo_k1_padded_budget_exact": "mrpo token budget, as is (exact lengths)",
    "mrpo_k1_padded_budget": "mrpo token budget, bucketed",
}


def main(argv: list[str]) -> None:
    training = json.loads(Path(argv[0]).read_text())
    results = training["results"]
    trl = [results[name]["tokens_per_s"] for name in ("trl_gc0", "trl_gc1") if name in results]
    fastest = max(trl) if trl else float("nan")
    print(f"\n{training['device']}, shape {training.get('shape')}; x TRL: against TRL's fastest variant")
    print(f"{'what':<44}{'tokens/s':>10}{'x TRL':>8}{'MFU':>8}{'peak GiB':>10}")
    for name, label in LABELS.items():
        if name not in results:
            print(f"{label:<44}{'not run':>10}")
            continue
        r = results[name]
        mfu = f"{r['mfu']:.1%}" if r.get("mfu") is not None else "-"
        peak = f"{r['peak_mem_GiB']:.2f}" if r.get("peak_mem_GiB") is not None else "-"
        print(f"{label:<44}{r['tokens_per_s']:>10,.0f}{r['tokens_per_s'] / fastest:>8.2f}{mfu:>8}{peak:>10}")
    if len(argv) > 1 and Path(argv[1]).exists():
        precompute = json.loads(Path(argv[1]).read_text())
        print(f"{'precompute / bare forward (padded rows)':<44}{precompute['mrpo_vs_bare']:>10.2f}")
        print(f"{'precompute / bare forward (prefix-shared)':<44}{precompute['mrpo_shared_vs_bare']:>10.2f}")
    else:
        print(f"{'precompute / bare forward':<44}{'not run':>10}")


if __name__ == "__main__":
    main(sys.argv[1:])
