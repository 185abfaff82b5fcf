"""Training examples and their batches: the policy's tokens for chosen and rejected plus K cached reference columns.

A training example is one pair as the *policy* tokenizes it, with the K references' cached sequence log-probs
attached. The collator pads the 2B sequences of a batch into one tensor, chosen rows first, so the trainer gets
both responses' log-probs from a single forward; or packs them into one row without padding, where
``fast_path`` chooses it for the configured attention kernel; or puts each pair in one prefix-shared row,
its prompt once (``policy.prefix_shared``). The rows and micro-batches are cut by ``mrpo.batching``'s rules.

Worked example (pad id 0, right padding, K = 2)::

    examples = [
        {"pair_id": "a", "chosen_input_ids": [5, 6, 7], "chosen_prompt_length": 2,
         "rejected_input_ids": [5, 6, 8, 9], "rejected_prompt_length": 2,
         "reference_chosen_logps": [-1.0, -2.0], "reference_rejected_logps": [-3.0, -4.0]},
    ]
    batch = collator(examples)
    batch["input_ids"]        == [[5, 6, 7, 0], [5, 6, 8, 9]]      # chosen rows, then rejected rows
    batch["attention_mask"]   == [[1, 1, 1, 0], [1, 1, 1, 1]]
    batch["completion_mask"]  == [[0, 0, 1, 0], [0, 0, 1, 1]]
    batch["prediction_positions"] == [[0, 1, 1], [1, 1, 2]]   # (row, column) of states predicting completions
    batch["reference_chosen_logps"]   == [[-1.0], [-2.0]]         # (K, B)
    batch["reference_rejected_logps"] == [[-3.0], [-4.0]]
    batch["pair_ids"]                 == ["a"]                    # for error messages
    batch["num_tokens"]               == 7                        # real tokens (TRL's num_tokens metric)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.data import Dataset

from mrpo.batching import (
    bucket_length,
    longest_first_groups,
    pack_sequences,
    pad_batch,
    prefix_shared_batch,
    prefix_shared_length,
    token_budget_groups,
)
from mrpo.data.token_store import TokenizedPair, TokenizedSequence
from mrpo.errors import CollatorError

REQUIRED_FIELDS = (
    "chosen_input_ids",
    "chosen_prompt_length",
    "rejected_input_ids",
    "rejected_prompt_length",
    "reference_chosen_logps",
    "reference_rejected_logps",
)


class PreferenceDataset(Dataset):
    """Pairs as the policy tokenizes them, each with its K cached reference log-probs."""

    def __init__(
        self,
        pairs: Sequence[TokenizedPair],
        reference_chosen_logps: torch.Tensor,
        reference_rejected_logps: torch.Tensor,
    ):
        """
        Args:
            pairs: the policy's tokenization of each pair.
            reference_chosen_logps: ``(K, N)`` cached reference log-probs of the chosen responses, aligned to pairs.
            reference_rejected_logps: ``(K, N)`` likewise for the rejected responses.
        """
        if reference_chosen_logps.shape != reference_rejected_logps.shape or reference_chosen_logps.shape[
            1
        ] != len(pairs):
            raise ValueError(
                f"reference columns {tuple(reference_chosen_logps.shape)} / {tuple(reference_rejected_logps.shape)} "
                f"do not match {len(pairs)} pairs: expected (K, {len(pairs)}) each"
            )
        # Kept as given: a ``TokenizedPairs`` stays compact and builds each pair when it is read.
        self.pairs = pairs if isinstance(pairs, Sequence) else list(pairs)
        self.reference_chosen_logps = reference_chosen_logps.float()
        self.reference_rejected_logps = reference_rejected_logps.float()

    @property
    def num_references(self) -> int:
        return self.reference_chosen_logps.shape[0]

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, index: int) -> dict[str, Any]:
        pair = self.pairs[index]
        return {
            "pair_id": pair.pair_id,
            "chosen_input_ids": pair.chosen.input_ids,
            "chosen_prompt_length": pair.chosen.prompt_length,
            "rejected_input_ids": pair.rejected.input_ids,
            "rejected_prompt_length": pair.rejected.prompt_length,
            "reference_chosen_logps": self.reference_chosen_logps[:, index],
            "reference_rejected_logps": self.reference_rejected_logps[:, index],
        }


@dataclass
class PreferenceCollator:
    """Pads a list of examples into one batch of 2B sequences (chosen first) plus ``(K, B)`` reference columns.

    With ``padding_free=True`` the 2B sequences are packed into one row instead (``batching.pack_sequences``:
    ``input_ids``, ``position_ids``, ``completion_mask``, ``sequence_index``), for attention kernels that respect
    document boundaries; the trainer picks the matching log-prob path from the batch's keys. With
    ``prefix_shared=True`` each pair is one row, [shared prefix | chosen tail | rejected tail]
    (``batching.prefix_shared_batch``: ``input_ids``, ``position_ids``, ``segment_ids``, ``prediction_positions``,
    ``prediction_targets``, ``prediction_owners``), padded on the right whatever ``padding_side`` is.

    With ``micro_batch_tokens`` set, a batch whose forward would cost more tokens than that (padded: 2 x pairs x
    longest sequence; packed: the total length; prefix-shared: pairs x longest row) is split by
    ``batching.token_budget_groups`` (prefix-shared: ``token_budget_batches`` of its rows) into length-grouped
    micro-batches, returned as ``{"micro_batches": [batch, ...]}``; each carries ``loss_weight`` = its share of the
    pairs, so that the weighted sum of the micro-batch losses is the loss of the whole batch (the MRPO loss is a
    mean over pairs, and nothing in it couples two pairs). A batch within the budget is returned as one batch.
    Under a budget every row's length is rounded up by ``batching.bucket_length`` (to ``pad_to_multiple_of``, or
    four lengths per doubling without it), so that micro-batch shapes repeat; the padding is masked.
    """

    pad_token_id: int
    padding_side: str = "right"
    pad_to_multiple_of: int | None = None
    padding_free: bool = False
    micro_batch_tokens: int | None = None
    prefix_shared: bool = False
    bucket: bool = False
    """Round every batch's row length up by ``batching.bucket_length``, not only under a token budget (compiled
    layers: ``fast_path``)."""

    def __post_init__(self) -> None:
        if self.prefix_shared and self.padding_free:
            raise ValueError("padding_free and prefix_shared are two row layouts: choose one")

    def __call__(self, examples: Sequence[dict[str, Any]]) -> dict[str, Any]:
        self._check(examples)
        if self.micro_batch_tokens is None:
            return self._collate(examples)
        groups = self._groups(examples)
        if len(groups) == 1:
            return self._collate(examples)
        micro_batches = []
        for group in groups:
            batch = self._collate([examples[i] for i in group])
            batch["loss_weight"] = len(group) / len(examples)
            micro_batches.append(batch)
        return {"micro_batches": micro_batches}

    def _groups(self, examples: Sequence[dict[str, Any]]) -> list[list[int]]:
        assert self.micro_batch_tokens is not None
        if self.prefix_shared:
            rows = [prefix_shared_length(*_sequences(e)) for e in examples]
            return longest_first_groups(
                rows,
                self.micro_batch_tokens,
                lambda group: (
                    len(group) * bucket_length(max(rows[i] for i in group), self.pad_to_multiple_of)
                ),
            )
        lengths = [(len(e["chosen_input_ids"]), len(e["rejected_input_ids"])) for e in examples]
        return token_budget_groups(
            lengths,
            self.micro_batch_tokens,
            padded=not self.padding_free,
            pad_to_multiple_of=self.pad_to_multiple_of,
            bucketed=True,
        )

    def _row_length(self, pairs: Sequence[tuple[TokenizedSequence, TokenizedSequence]]) -> int:
        """The length a batch of these pairs pads to: its longest row (a packed row: all its tokens)."""
        if self.prefix_shared:
            return max(prefix_shared_length(chosen, rejected) for chosen, rejected in pairs)
        lengths = [len(sequence.input_ids) for pair in pairs for sequence in pair]
        return sum(lengths) if self.padding_free else max(lengths)

    def _check(self, examples: Sequence[dict[str, Any]]) -> None:
        if not examples:
            raise CollatorError("empty batch: the collator got no examples")
        for position, example in enumerate(examples):
            missing = [name for name in REQUIRED_FIELDS if name not in example]
            if missing:
                pair = example.get("pair_id", "?")
                hint = (
                    " The cached reference log-probs are missing: build the data with mrpo.pipeline (or run "
                    "`mrpo precompute`) so every example carries its K reference columns."
                    if any(name.startswith("reference_") for name in missing)
                    else ""
                )
                raise CollatorError(
                    f"example {position} of the batch (pair {pair}) lacks {', '.join(missing)}.{hint}"
                )

    def _collate(self, examples: Sequence[dict[str, Any]]) -> dict[str, Any]:
        pairs = [_sequences(e) for e in examples]
        sequences = [chosen for chosen, _ in pairs] + [rejected for _, rejected in pairs]
        multiple = self.pad_to_multiple_of
        if self.micro_batch_tokens is not None or self.bucket:
            # The row's bucket: padding to a multiple of a length at least the row's own pads to that length.
            multiple = bucket_length(self._row_length(pairs), multiple)
        if self.prefix_shared:
            batch = prefix_shared_batch(pairs, pad_token_id=self.pad_token_id, pad_to_multiple_of=multiple)
        elif self.padding_free:
            batch = pack_sequences(sequences, pad_to_multiple_of=multiple)
        else:
            batch = pad_batch(
                sequences,
                pad_token_id=self.pad_token_id,
                padding_side=self.padding_side,
                pad_to_multiple_of=multiple,
            )
        batch["pair_ids"] = [str(e.get("pair_id", position)) for position, e in enumerate(examples)]
        batch["num_tokens"] = sum(
            len(sequence.input_ids) for sequence in sequences
        )  # real tokens, no padding
        num_references = {len(e["reference_chosen_logps"]) for e in examples}
        num_references |= {len(e["reference_rejected_logps"]) for e in examples}
        if len(num_references) != 1:
            raise CollatorError(f"examples carry different numbers of references: {sorted(num_references)}")
        for side in ("chosen", "rejected"):
            batch[f"reference_{side}_logps"] = torch.stack(
                [torch.as_tensor(e[f"reference_{side}_logps"], dtype=torch.float32) for e in examples], dim=1
            )
        return batch


def _sequences(example: dict[str, Any]) -> tuple[TokenizedSequence, TokenizedSequence]:
    """An example's chosen and rejected sequences."""
    chosen, rejected = (
        TokenizedSequence(tuple(example[f"{side}_input_ids"]), int(example[f"{side}_prompt_length"]))
        for side in ("chosen", "rejected")
    )
    return chosen, rejected
