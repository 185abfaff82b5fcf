"""Tests of mrpo.data.tokenization: rendering, BOS/EOS, the prompt/completion boundary, overflow and fingerprints."""

import copy

import pytest

from mrpo.batching import pad_batch
from mrpo.data.token_store import (
    TokenizedPairs,
    TokenizedSequence,
    pair_ids_of,
    sequence_at,
    sequence_lengths,
)
from mrpo.data.tokenization import ModelView, RenderError, tokenize_for_models
from tiny_models import (
    GEMMA_LIKE_TEMPLATE,
    Pair,
    bpe_tokenizer,
    char_tokenizer,
    conversational_pairs,
    standard_pairs,
)


def encode(tokenizer, text):
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def completion_ids(sequence: TokenizedSequence) -> list[int]:
    return list(sequence.input_ids[sequence.prompt_length :])


# -- standard (string) pairs ------------------------------------------------------------------------------------


def test_standard_pair_without_boundary_merge_uses_the_joint_tokenization():
    tok = bpe_tokenizer()
    pair = Pair("p", "The capital of France is", " Paris.", " Rome.")
    tokenized = ModelView(tok).tokenize(pair)
    # No BOS (the tokenizer adds none), the text tokenized as a whole, EOS appended once.
    assert list(tokenized.chosen.input_ids) == encode(tok, "The capital of France is Paris.") + [
        tok.eos_token_id
    ]
    assert tokenized.chosen.prompt_length == len(encode(tok, "The capital of France is"))
    assert tok.decode(completion_ids(tokenized.rejected)) == " Rome.<|im_end|>"


@pytest.mark.parametrize(
    ("prompt", "completion"),
    [("Question: What colour is the sky?\n", "\nThe sky is blue."), ("Question: ", "blue")],
    ids=["newline-newline", "trailing-space"],
)
def test_boundary_merge_keeps_the_completion_tokens_exactly(prompt, completion):
    tok = bpe_tokenizer()
    joint = encode(tok, prompt + completion)
    assert joint[: len(encode(tok, prompt))] != encode(tok, prompt), "the case must merge across the boundary"
    tokenized = ModelView(tok).tokenize(Pair("p", prompt, completion, completion))
    assert list(tokenized.chosen.input_ids[: tokenized.chosen.prompt_length]) == encode(tok, prompt)
    assert completion_ids(tokenized.chosen) == encode(tok, completion) + [tok.eos_token_id]


@pytest.mark.parametrize("tokenizer", [bpe_tokenizer, char_tokenizer], ids=["bpe-chatml", "char-plain"])
def test_tokenize_many_in_one_batch_equals_one_pair_at_a_time(tokenizer):
    view = ModelView(tokenizer())
    pairs = [
        *standard_pairs(),
        *conversational_pairs(),
        Pair("merge", "Question: What colour is the sky?\n", "\nThe sky is blue.", "\nGreen."),
        Pair("no-prompt", "", " a", " b"),  # no tokens to condition on where the tokenizer adds no BOS
        Pair("mixed", "a string prompt", [{"role": "assistant", "content": "x"}], " y"),
    ]
    batched = view.tokenize_many([p for p in pairs if p.pair_id != "mixed"])
    singly = []
    for pair in pairs[:-1]:
        try:
            singly.append(view.tokenize(pair))
        except RenderError as error:
            singly.append(str(error))
    assert [str(b) if isinstance(b, RenderError) else b for b in batched] == singly
    assert any(isinstance(b, RenderError) for b in batched) == (tokenizer is bpe_tokenizer)
    with pytest.raises(TypeError, match="mixed"):  # a malformed pair is a bug upstream, not a counted drop
        view.tokenize_many(pairs[-1:])


def test_standard_pair_with_bos_tokenizer_gets_one_bos_and_one_eos():
    tok = char_tokenizer()
    tokenized = ModelView(tok).tokenize(Pair("p", "Hi", " there", " you"))
    assert list(tokenized.chosen.input_ids) == [tok.bos_token_id, *encode(tok, "Hi there"), tok.eos_token_id]
    assert tokenized.chosen.prompt_length == 3


def test_eos_is_not_appended_twice_when_the_completion_already_ends_with_it():
    tok = bpe_tokenizer()
    tokenized = ModelView(tok).tokenize(Pair("p", "Two plus two is", " four.<|im_end|>", " six."))
    assert completion_ids(tokenized.chosen).count(tok.eos_token_id) == 1
    assert completion_ids(tokenized.chosen)[-1] == tok.eos_token_id
    assert completion_ids(tokenized.rejected).count(tok.eos_token_id) == 1


# -- conversational pairs ---------------------------------------------------------------------------------------


def test_chat_template_rendering_and_end_of_turn():
    tok = bpe_tokenizer()
    pair = conversational_pairs()[1]
    view = ModelView(tok)
    prompt_text, chosen_text, _ = view.render(pair)
    assert prompt_text == "<|im_start|>user\nWhat is 2 + 2?<|im_end|>\n<|im_start|>assistant\n"
    # The template closes the turn with <|im_end|> (the EOS), so no second EOS is appended.
    assert chosen_text == prompt_text + "4<|im_end|>\n"
    tokenized = view.tokenize(pair)
    assert list(tokenized.chosen.input_ids[: tokenized.chosen.prompt_length]) == encode(tok, prompt_text)
    assert tok.decode(completion_ids(tokenized.chosen)) == "4<|im_end|>\n"
    assert completion_ids(tokenized.chosen).count(tok.eos_token_id) == 1


def test_plain_rendering_without_chat_template():
    tok = char_tokenizer()
    assert not tok.chat_template
    view = ModelView(tok)
    prompt_text, chosen_text, rejected_text = view.render(conversational_pairs()[0])
    assert prompt_text == "System: Be brief.\n\nUser: Capital of Spain?\n\nAssistant:"
    assert chosen_text == prompt_text + " Madrid.<eos>"
    assert rejected_text == prompt_text + " Paris, I think.<eos>"
    tokenized = view.tokenize(conversational_pairs()[0])
    ids = list(tokenized.chosen.input_ids)
    assert ids[0] == tok.bos_token_id and ids.count(tok.bos_token_id) == 1
    assert ids[-1] == tok.eos_token_id and ids.count(tok.eos_token_id) == 1
    assert tok.decode(completion_ids(tokenized.chosen)) == " Madrid.<eos>"


def test_plain_rendering_of_several_completion_messages():
    pair = Pair(
        "p",
        [{"role": "user", "content": "Hi"}],
        [{"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Bye"}],
        [{"role": "assistant", "content": "Go away."}],
    )
    _, chosen_text, _ = ModelView(char_tokenizer()).render(pair)
    assert chosen_text == "User: Hi\n\nAssistant: Hello.\n\nUser: Bye<eos>"


def test_bos_written_by_the_chat_template_is_not_doubled():
    tok = char_tokenizer(GEMMA_LIKE_TEMPLATE)
    view = ModelView(tok)
    pair = conversational_pairs()[1]
    prompt_text, chosen_text, _ = view.render(pair)
    assert prompt_text.startswith("<bos><start_of_turn>user\n")
    # <end_of_turn> closes the turn, so EOS is not appended.
    assert chosen_text == prompt_text + "4<end_of_turn>\n"
    ids = list(view.tokenize(pair).chosen.input_ids)
    assert ids[0] == tok.bos_token_id and ids.count(tok.bos_token_id) == 1
    assert tok.eos_token_id not in ids


def test_template_that_renders_the_prompt_differently_is_a_counted_drop():
    tok = copy.deepcopy(bpe_tokenizer())
    # Like templates that add an (empty) thought block to the generation prompt only.
    tok.chat_template = bpe_tokenizer().chat_template.replace(
        "'<|im_start|>assistant\n'", "'<|im_start|>assistant\nthink\n'"
    )
    view = ModelView(tok, name="thinker")
    with pytest.raises(RenderError):
        view.tokenize(conversational_pairs()[0])
    result = tokenize_for_models(conversational_pairs(), [view], max_length=None)
    assert result.pair_ids == []
    assert result.dropped == {"chat template renders the prompt differently alone for thinker": 2}


# -- several views, overflow ------------------------------------------------------------------------------------


def two_views():
    return [ModelView(bpe_tokenizer(), name="bpe"), ModelView(char_tokenizer(), name="char")]


def test_views_stay_aligned_and_keep_everything_without_limit():
    result = tokenize_for_models(standard_pairs(), two_views(), max_length=None)
    assert result.pair_ids == [p.pair_id for p in standard_pairs()]
    for per_view in result.per_view:
        assert [t.pair_id for t in per_view] == result.pair_ids
    assert not result.dropped
    assert result.summary() == "kept 3 of 3 pairs for bpe, char"


def test_tokenized_pairs_store_flat_and_read_back_the_same_pairs():
    view = ModelView(bpe_tokenizer(), name="bpe")
    pairs = [view.tokenize(p) for p in standard_pairs()]
    result = tokenize_for_models(standard_pairs(), [view], max_length=None)
    compact = result.per_view[0]
    assert isinstance(compact, TokenizedPairs)
    assert list(compact) == pairs and compact == pairs and compact == TokenizedPairs(pairs)
    assert compact[-1] == pairs[-1] and compact[1:] == pairs[1:]
    assert type(compact[0].chosen.input_ids) is tuple  # what the collator and pad_batch read, as before
    with pytest.raises(IndexError, match="out of range"):
        compact[len(pairs)]
    # Lengths, ids and single sequences without building pairs, in the order score_pairs batches them.
    assert list(sequence_lengths(compact)) == sequence_lengths(pairs)
    assert sequence_lengths(pairs) == [len(s.input_ids) for p in pairs for s in (p.chosen, p.rejected)]
    assert pair_ids_of(compact) == pair_ids_of(pairs) == result.pair_ids
    for j in range(2 * len(pairs)):
        assert sequence_at(compact, j) == sequence_at(pairs, j)
    # 4 bytes a token (plus the end, prompt length and checksum of each sequence), not a tuple of Python ints.
    tokens = sum(sequence_lengths(pairs))
    assert compact.nbytes == 4 * tokens + (8 + 4 + 8) * 2 * len(pairs)


def test_views_of_one_tokenizer_object_tokenize_each_pair_once_and_share_storage(monkeypatch):
    calls = []
    original = ModelView.tokenize_many

    def counting(self, pairs):
        calls.extend([self.name] * len(pairs))
        return original(self, pairs)

    monkeypatch.setattr(ModelView, "tokenize_many", counting)
    shared = bpe_tokenizer()  # load_views loads a tokenizer named twice once
    policy, init, char = (
        ModelView(shared, name="policy"),
        ModelView(shared, name="init"),
        ModelView(char_tokenizer(), name="char"),
    )
    pairs = standard_pairs()
    result = tokenize_for_models(pairs, [policy, init, char], max_length=None)
    assert calls == ["policy"] * len(pairs) + ["char"] * len(pairs)
    assert result.per_view[0] is result.per_view[1] and result.per_view[2] is not result.per_view[0]
    assert list(result.per_view[1]) == [init.tokenize(p) for p in pairs]
    # A smaller limit on the second view drops the pair for all and is counted under that view's name.
    longest = max(max(len(t.chosen.input_ids), len(t.rejected.input_ids)) for t in result.per_view[0])
    limited = tokenize_for_models(pairs, [policy, init], max_length=[None, longest - 1])
    assert limited.dropped == {f"longer than {longest - 1} tokens for init": 1}
    assert limited.per_view[0] is limited.per_view[1] and len(limited.per_view[0]) == len(pairs) - 1


def test_pair_too_long_for_one_view_is_dropped_for_all():
    views = two_views()
    pairs = standard_pairs()
    lengths = {
        view.name: [
            max(len(t.chosen.input_ids), len(t.rejected.input_ids)) for t in map(view.tokenize, pairs)
        ]
        for view in views
    }
    # The character tokenizer needs more tokens: this limit fits every pair for "bpe" and some for "char".
    limit = max(max(lengths["bpe"]), min(lengths["char"]))
    too_long = [p.pair_id for p, n in zip(pairs, lengths["char"], strict=True) if n > limit]
    assert too_long and len(too_long) < len(pairs)
    result = tokenize_for_models(pairs, views, max_length=limit)
    assert result.pair_ids == [p.pair_id for p in pairs if p.pair_id not in too_long]
    assert [t.pair_id for t in result.per_view[0]] == result.pair_ids
    assert [t.pair_id for t in result.per_view[1]] == result.pair_ids
    assert result.dropped == {f"longer than {limit} tokens for char": len(too_long)}
    assert f"dropped: {len(too_long)} longer than {limit} tokens for char" in result.summary()

    # One limit per view: no limit for char keeps everything.
    assert tokenize_for_models(pairs, views, max_length=[limit, None]).pair_ids == [p.pair_id for p in pairs]


def test_truncate_needs_one_shared_tokenizer():
    with pytest.raises(ValueError, match="share one tokenizer"):
        tokenize_for_models(standard_pairs(), two_views(), max_length=10, overflow="truncate")


def test_truncate_cuts_completion_ends_identically_and_drops_overlong_prompts():
    tok = bpe_tokenizer()
    views = [ModelView(tok, name="policy"), ModelView(copy.deepcopy(tok), name="reference")]
    assert views[0].fingerprint == views[1].fingerprint
    pairs = standard_pairs()
    full = [views[0].tokenize(p) for p in pairs]
    limit = 9
    result = tokenize_for_models(
        pairs, views, max_length=[limit, 12], overflow="truncate"
    )  # the smaller wins
    kept = [p.pair_id for p, t in zip(pairs, full, strict=True) if t.chosen.prompt_length < limit]
    assert result.pair_ids == kept and len(kept) < len(pairs)
    assert result.dropped == {f"prompt reaches {limit} tokens for policy": len(pairs) - len(kept)}
    for original in full:
        if original.pair_id not in kept:
            continue
        i = result.pair_ids.index(original.pair_id)
        for per_view in result.per_view:
            truncated = per_view[i].chosen
            assert truncated.input_ids == original.chosen.input_ids[:limit]
            assert truncated.prompt_length == original.chosen.prompt_length


# -- fingerprint, padding ---------------------------------------------------------------------------------------


def test_fingerprint_is_stable_and_changes_with_template_and_vocabulary():
    tok = bpe_tokenizer()
    reference = ModelView(tok).fingerprint
    assert ModelView(copy.deepcopy(tok), name="other name").fingerprint == reference

    retemplated = copy.deepcopy(tok)
    retemplated.chat_template = tok.chat_template.replace("assistant", "bot")
    assert ModelView(retemplated).fingerprint != reference

    extended = copy.deepcopy(tok)
    extended.add_tokens(["<extra>"])
    assert ModelView(extended).fingerprint != reference

    assert (
        ModelView(char_tokenizer()).fingerprint != ModelView(char_tokenizer(GEMMA_LIKE_TEMPLATE)).fingerprint
    )


def test_padding_side_and_pad_id_follow_the_tokenizer():
    bpe, char = (ModelView(bpe_tokenizer()), ModelView(char_tokenizer()))
    assert (bpe.padding_side, bpe.pad_token_id) == (
        "right",
        bpe_tokenizer().convert_tokens_to_ids("<|im_end|>"),
    )
    assert (char.padding_side, char.pad_token_id) == ("left", 0)

    sequences = [char.tokenize(p).chosen for p in standard_pairs()[:2]]
    batch = pad_batch(sequences, pad_token_id=char.pad_token_id, padding_side=char.padding_side)
    shorter = min(range(2), key=lambda i: len(sequences[i].input_ids))
    n = len(sequences[shorter].input_ids)
    assert batch["input_ids"][shorter, -n:].tolist() == list(sequences[shorter].input_ids)
    assert batch["attention_mask"][shorter].tolist() == [0] * (batch["input_ids"].shape[1] - n) + [1] * n


# -- several processes ------------------------------------------------------------------------------------------


def varied_pairs(n: int = 40) -> list:
    """Standard and conversational pairs of varied lengths; among them one too long to tokenize (provably, for
    the byte-level BPE), and one whose completion opens with a user turn (no rendering takes it). Of the data
    module's ``PreferencePair``: the workers unpickle them without importing tiny_models' torch."""
    import random

    from mrpo.data.pairs import PreferencePair as Pair
    from tiny_models import CORPUS

    rng = random.Random(0)

    def text(words: int) -> str:
        return " ".join(rng.choice(" ".join(CORPUS).split()) for _ in range(words))

    pairs: list[Pair] = []
    for i in range(n):
        prompt, chosen, rejected = (
            text(rng.randint(1, 30)),
            text(rng.randint(1, 40)),
            text(rng.randint(1, 40)),
        )
        if i % 2:
            pairs.append(Pair(f"s{i}", prompt, " " + chosen, " " + rejected))
        else:
            turn = [{"role": "user", "content": prompt}]
            pairs.append(
                Pair(
                    f"c{i}",
                    turn,
                    [{"role": "assistant", "content": chosen}],
                    [{"role": "assistant", "content": rejected}],
                )
            )
    pairs[7] = Pair("huge", text(20), " " + "x" * 60_000, " no")
    pairs[12] = Pair(
        "user-first", [{"role": "user", "content": "Hi"}], [{"role": "user", "content": "Hi"}], []
    )
    return pairs


def test_worker_processes_give_the_tokens_ids_drops_and_order_of_one_process(monkeypatch):
    import mrpo.data.tokenization as tokenization

    monkeypatch.setattr(tokenization, "TOKENIZE_BLOCK", 4)  # ten blocks, more than two workers hold at once
    shared = bpe_tokenizer()
    views = [
        ModelView(shared, name="policy"),
        ModelView(shared, name="init"),  # one tokenizer object with the policy: one storage
        ModelView(char_tokenizer(), name="char"),  # no chat template: the plain rendering
        ModelView(char_tokenizer(GEMMA_LIKE_TEMPLATE), name="gemma"),
    ]
    pairs = varied_pairs()
    limits = [400, None, 280, None]
    one = tokenize_for_models(pairs, views, max_length=limits)
    two = tokenize_for_models(iter(pairs), views, max_length=limits, num_proc=2)
    reasons = set(one.dropped)
    assert "longer than 400 tokens for policy" in reasons  # the huge pair, dropped before tokenizing
    assert "longer than 280 tokens for char" in reasons
    assert "chat template renders the prompt differently alone for policy" in reasons  # the user-first pair
    assert 20 < len(one.pair_ids) < len(pairs)
    assert list(two.pair_ids) == list(one.pair_ids)
    assert two.dropped == one.dropped and two.summary() == one.summary()
    assert two.owners == one.owners == [0, 0, 2, 3] and two.per_view[0] is two.per_view[1]
    for mine, theirs in zip(two.per_view, one.per_view, strict=True):
        assert list(mine) == list(theirs)
        assert (mine.pair_tags() == theirs.pair_tags()).all()  # the checksums computed in the workers
