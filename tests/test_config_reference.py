"""docs/config.md and `mrpo defaults` come from the schema: the doc is current, and the defaults file loads."""

from pathlib import Path

from mrpo.cli import main
from mrpo.config.docs import defaults_yaml, reference_markdown
from mrpo.config.schema import MRPOConfig, load_config

DOC = Path(__file__).resolve().parents[1] / "docs" / "config.md"


def test_docs_config_md_is_current():
    assert DOC.read_text() == reference_markdown(), "regenerate it: mrpo defaults --markdown > docs/config.md"


def test_the_reference_names_every_key_users_found_only_in_recipes():
    text = reference_markdown()
    for key in ("`save_merged`", "`max_eval_pairs`", "`drop_identical`", "`align`", "`hash_weights`"):
        assert key in text


def test_defaults_file_loads_and_holds_the_defaults(tmp_path, capsys):
    assert main(["defaults"]) == 0
    path = tmp_path / "defaults.yaml"
    path.write_text(capsys.readouterr().out)
    config = load_config(path)
    expected = MRPOConfig.from_dict(
        {"policy": {"model": config.policy.model}, "data": {"train": "pairs.jsonl"}}
    )
    assert config.to_dict() == expected.to_dict()
    assert path.read_text() == defaults_yaml()
