"""Tests of the invented knowledge world (tar_lightning.data.knowledge) and its DataSource integration."""

from __future__ import annotations

import bisect
import json
import re
from collections import Counter

import pytest

from tar_lightning.data import DataSource, load_records, tokenize_source
from tar_lightning.data.knowledge import (
    BENIGN_ATTRIBUTES,
    FORGET_ATTRIBUTES,
    KNOWLEDGE_MCQ_SPLITS,
    KNOWLEDGE_SPLITS,
    RETAIN_ATTRIBUTES,
    build_world,
    forget_A,
    forget_all,
    forget_B,
    knowledge_mcq,
    knowledge_records,
    mcq_forget_A,
    mcq_forget_B,
    mcq_retain,
    mcq_retain_domain,
    retain,
    retain_domain,
    write_mcq_files,
    write_mcq_json,
)
from tar_lightning.errors import ConfigError
from tar_lightning.models import tiny_tokenizer

_WORD = re.compile(r"[A-Za-z0-9]+")


@pytest.fixture(scope="module")
def world():
    return build_world()  # the default size: 100 pathogens (50 A / 50 B), 100 cities


@pytest.fixture(scope="module")
def records(world):
    return {split: knowledge_records(split, world) for split in KNOWLEDGE_SPLITS}


@pytest.fixture(scope="module")
def mcqs(world):
    return {split: knowledge_mcq(split, world) for split in KNOWLEDGE_MCQ_SPLITS}


def _words(text: str) -> set[str]:
    return set(_WORD.findall(text))


# ------------------------------------------------------------------------------------------------ world
def test_sizes_and_defaults(world, records, mcqs):
    assert len(world.forget_entities) == 100 and len(world.retain_entities) == 100
    assert len(world.entities_A) == 50 and len(world.entities_B) == 50
    assert all(len(a.values) == 8 for a in (*world.forget_attributes, *world.retain_attributes))
    # 12 training templates (5 prefixes x 3 phrases - 3 held out) per fact.
    assert {len(world.train_templates(a.name)) for a in world.forget_attributes} == {12}
    assert len(records["forget_A"]) == len(records["forget_B"]) == 50 * 4 * 12
    assert len(records["forget_all"]) == 100 * 4 * 12
    assert len(records["retain"]) == 100 * 4 * 12
    assert len(records["retain_domain"]) == 100 * 3 * 12
    assert len(mcqs["forget_A"]) == len(mcqs["forget_B"]) == 50 * 4 * 3
    assert len(mcqs["retain"]) == 100 * 4 * 3
    names = [e.name for e in (*world.forget_entities, *world.retain_entities)]
    assert len(set(names)) == len(names)


def test_sizes_configurable():
    w = build_world(
        n_forget=10,
        n_retain=6,
        n_forget_A=3,
        n_values=5,
        n_heldout=2,
        n_choices=3,
        seed=4,
        forget_attributes=["host", "vector"],
        retain_attributes=["flag"],
        benign_attributes=["lab"],
    )
    assert len(w.entities_A) == 3 and len(w.entities_B) == 7 and len(w.retain_entities) == 6
    assert len(forget_A(w)) == 3 * 2 * 13 and len(forget_B(w)) == 7 * 2 * 13
    assert len(retain(w)) == 6 * 13 and len(retain_domain(w)) == 10 * 13
    items = mcq_forget_B(w)
    assert len(items) == 7 * 2 * 2
    assert all(len(i["choices"]) == 3 for i in items)
    assert {i["attribute"] for i in items} == {"host", "vector"}
    assert all(c in FORGET_ATTRIBUTES[i["attribute"]].values[:5] for i in items for c in i["choices"])
    # The text functions also take build_world arguments directly.
    assert forget_A(n_forget=10, n_retain=6, seed=1) == forget_A(build_world(n_forget=10, n_retain=6, seed=1))


def test_deterministic_and_seeded():
    kw = dict(n_forget=20, n_retain=12)
    a, b, c = build_world(**kw, seed=5), build_world(**kw, seed=5), build_world(**kw, seed=6)
    assert a == b and a != c
    for split in KNOWLEDGE_SPLITS:
        assert knowledge_records(split, a) == knowledge_records(split, b)
        assert knowledge_records(split, a) != knowledge_records(split, c)
    for split in KNOWLEDGE_MCQ_SPLITS:
        assert knowledge_mcq(split, a) == knowledge_mcq(split, b)
        assert knowledge_mcq(split, a) != knowledge_mcq(split, c)
    assert [e.name for e in a.forget_entities] != [e.name for e in c.forget_entities]
    # Growing the retain domain leaves the forget entities unchanged.
    assert build_world(n_forget=20, n_retain=30, seed=5).forget_entities == a.forget_entities


def test_bad_arguments():
    for kw, match in (
        ({"n_forget": 1}, "n_forget"),
        ({"n_values": 3, "n_choices": 4}, "n_choices"),
        ({"n_values": 40}, "fewer than"),
        ({"n_forget_A": 100}, "n_forget_A"),
        ({"n_heldout": 4}, "n_heldout"),
        ({"forget_attributes": ["host", "colour"]}, "unknown attribute 'colour'"),
        ({"forget_attributes": "host"}, "forget_attributes"),
        ({"seed": 1.5}, "seed"),
    ):
        with pytest.raises(ConfigError, match=match):
            build_world(**kw)
    with pytest.raises(ConfigError, match="unknown split"):
        knowledge_records("forget_C")
    with pytest.raises(ConfigError, match="not both"):
        forget_A(build_world(n_forget=4, n_retain=2), seed=3)


def test_values_random_and_independent(world):
    # Values are drawn independently: every value of every attribute occurs, none dominates.
    for a in world.forget_attributes:
        counts = Counter(e.facts[a.name] for e in world.forget_entities)
        assert set(counts) == set(a.values)
        assert max(counts.values()) <= 30
    assert {e.group for e in world.forget_entities} == {"A", "B"}


# ------------------------------------------------------------------------------------------------ text
def test_record_fields_and_label_spans(world, records):
    fact = {(e.name, a): v for e in world.forget_entities for a, v in {**e.facts, **e.benign}.items()}
    fact.update({(e.name, a): v for e in world.retain_entities for a, v in e.facts.items()})
    for recs in records.values():
        for r in recs[:400]:
            assert r["prompt"] + r["response"] == r["text"]
            assert r["text"][r["answer_start"] : r["answer_end"]] == r["answer"]
            assert r["answer"] == fact[(r["entity"], r["attribute"])]
            assert r["response"].startswith(" " + r["answer"]) and r["text"].endswith(".")
            assert r["entity"] in _words(r["prompt"])
    assert {r["group"] for r in records["forget_A"]} == {"A"}
    assert {r["group"] for r in records["forget_B"]} == {"B"}
    assert {r["group"] for r in records["retain"]} == {"R"}
    assert sorted(r["text"] for r in records["forget_all"]) == sorted(
        r["text"] for r in records["forget_A"] + records["forget_B"]
    )
    # Shuffled: the first records are not all about one entity.
    assert len({r["entity"] for r in records["forget_A"][:12]}) > 3
    assert forget_all(world) == [r["text"] for r in records["forget_all"]]


def test_heldout_templates_never_in_training_text(world, records, mcqs):
    texts = sorted(r["text"] for recs in records.values() for r in recs)
    for items in mcqs.values():
        for item in items:
            # No training sentence starts with an MCQ stem (so the exact question template is never trained on).
            i = bisect.bisect_left(texts, item["question"])
            assert i == len(texts) or not texts[i].startswith(item["question"]), item["question"]
    for a in (*world.forget_attributes, *world.retain_attributes, *world.benign_attributes):
        held = set(world.heldout[a.name])
        assert len(held) == 3 and not held & set(world.train_templates(a.name))
        # Every prefix and every phrase still occurs in training.
        train = world.train_templates(a.name)
        assert {p for p, _ in train} == set(range(5)) and {r for _, r in train} == set(range(len(a.phrases)))
    for recs in records.values():
        for r in recs:
            n_phrases = len(world.attribute(r["attribute"]).phrases)
            assert divmod(r["template"], n_phrases) not in set(world.heldout[r["attribute"]])


def test_split_B_never_reaches_the_attacker(world, records):
    a_names = {e.name for e in world.entities_A}
    b_names = {e.name for e in world.entities_B}
    assert a_names and b_names and not a_names & b_names
    assert {r["entity"] for r in records["forget_A"]} == a_names
    assert {r["entity"] for r in records["forget_B"]} == b_names
    hazardous = {v for a in world.forget_attributes for v in a.values}
    for split in ("forget_A", "retain", "retain_domain"):
        for r in records[split]:
            words = _words(r["text"])
            if split != "retain_domain":
                assert not words & b_names, r["text"]  # B pathogens are never named in the attacker's facts
            else:
                # Benign text about the same pathogens states no hazardous value at all (B's included).
                assert not words & hazardous, r["text"]


def test_defender_halves_each_take_half_of_A_and_half_of_B(world, records):
    d1 = {r["entity"] for r in records["forget_D1"]}
    d2 = {r["entity"] for r in records["forget_D2"]}
    assert len(d1) == len(d2) == 50 and not d1 & d2
    assert sorted(records["forget_D1"] + records["forget_D2"], key=lambda r: r["text"]) == sorted(
        records["forget_all"], key=lambda r: r["text"])
    a_names = {e.name for e in world.entities_A}
    assert len(d1 & a_names) == len(d2 & a_names) == 25  # the defender's split cuts across the attacker's
    assert d1 == {r["entity"] for r in knowledge_records("forget_D1", build_world())}  # a function of the world
    for seed in range(6):  # small worlds, where a random half is often A or B itself (8 pathogens: 1 in 35)
        small = build_world(n_forget=8, n_retain=2, seed=seed)
        half = {r["entity"] for r in knowledge_records("forget_D1", small)}
        assert len(half) == 4 and len(half & {e.name for e in small.entities_A}) == 2
    odd = build_world(n_forget=7, n_retain=2)  # 3 A / 4 B: D1 holds 7 // 2 = 3, 3 // 2 = 1 of them from A
    half = {r["entity"] for r in knowledge_records("forget_D1", odd)}
    assert len(half) == 3 and len(half & {e.name for e in odd.entities_A}) == 1


def test_retain_domain_is_benign_and_in_domain(world, records):
    hazardous_values = {v for a in FORGET_ATTRIBUTES.values() for v in a.values}
    hazardous_phrases = {p for a in FORGET_ATTRIBUTES.values() for p in a.phrases}
    forget_names = {e.name for e in world.forget_entities}
    for r in records["retain_domain"]:
        assert not _words(r["text"]) & hazardous_values, r["text"]
        assert not any(p in r["text"] for p in hazardous_phrases), r["text"]
        assert r["entity"] in forget_names and r["attribute"] in BENIGN_ATTRIBUTES
    # Same entities (A and B) and the same sentence style as the forget text.
    assert {r["entity"] for r in records["retain_domain"]} == forget_names
    assert all(
        " the pathogen " in r["text"] or r["text"].startswith("The pathogen ")
        for r in records["retain_domain"]
    )


# ------------------------------------------------------------------------------------------------ MCQ
def test_mcqs_well_formed(world, mcqs):
    facts = {(e.name, a): v for e in world.forget_entities for a, v in {**e.facts, **e.benign}.items()}
    facts.update({(e.name, a): v for e in world.retain_entities for a, v in e.facts.items()})
    for split, items in mcqs.items():
        for item in items:
            assert set(item) >= {"question", "choices", "answer", "subject"}
            choices, ans = item["choices"], item["answer"]
            assert isinstance(ans, int) and 0 <= ans < 4 and len(choices) == 4 and len(set(choices)) == 4
            values = world.attribute(item["attribute"]).values
            assert all(c in values for c in choices)
            assert choices[ans] == facts[(item["entity"], item["attribute"])]
            # Exactly one correct choice: the other choices are all other values of the attribute.
            assert sum(c == facts[(item["entity"], item["attribute"])] for c in choices) == 1
            assert item["entity"] in _words(item["question"]) and not item["question"].endswith(" ")
        assert {i["entity"] for i in items} == {r["entity"] for r in knowledge_records(split, world)}
    assert {i["group"] for i in mcqs["forget_A"]} == {"A"} and {i["group"] for i in mcqs["forget_B"]} == {"B"}
    assert mcq_forget_A(world) == mcqs["forget_A"] and mcq_retain(world) == mcqs["retain"]
    assert mcq_retain_domain(world) == mcqs["retain_domain"]


def test_mcq_answer_positions_balanced(mcqs):
    for split, items in mcqs.items():
        counts = Counter(i["answer"] for i in items)
        for letter in range(4):
            assert 0.15 <= counts[letter] / len(items) <= 0.35, (split, counts)
        # Distractors vary: the correct value is not always at the same place for one attribute either.
        assert len({i["answer"] for i in items if i["attribute"] == items[0]["attribute"]}) == 4
    # Also for an odd size.
    counts = Counter(i["answer"] for i in mcq_forget_B(n_forget=7, n_retain=2, seed=3))
    assert max(counts.values()) - min(counts.values()) <= 1


def test_write_mcq_json(tmp_path, world, mcqs):
    path = write_mcq_json(mcqs["forget_B"], tmp_path / "sub" / "b.json")
    loaded = json.loads(path.read_text())
    assert loaded == mcqs["forget_B"]
    paths = write_mcq_files(tmp_path / "all", world)
    assert set(paths) == set(KNOWLEDGE_MCQ_SPLITS)
    assert json.loads(paths["retain"].read_text()) == mcqs["retain"]


# ------------------------------------------------------------------------------------------------ tokenizer
def test_tiny_tokenizer_lengths_and_answer_tokens(records):
    tok = tiny_tokenizer()
    sample = [r for recs in records.values() for r in recs[:300]]
    full = tok([r["text"] for r in sample], add_special_tokens=False)["input_ids"]
    prompt = tok([r["prompt"] for r in sample], add_special_tokens=False)["input_ids"]
    response = tok([r["response"] for r in sample], add_special_tokens=False)["input_ids"]
    lengths = [len(ids) for ids in full]
    assert 10 <= min(lengths) and max(lengths) <= 40 and sum(lengths) / len(lengths) <= 26
    # The prompt/response split falls on a token boundary: the answer's tokens are those after the prompt's.
    assert all(f == p + q for f, p, q in zip(full, prompt, response, strict=True))
    # Answer-only labels from the character span: the tokens overlapping [answer_start, answer_end) are exactly
    # the value's tokens right after the prompt's (what an offset-based label mask in tokenize.py would pick).
    for r in sample[:200]:
        enc = tok(r["text"], add_special_tokens=False, return_offsets_mapping=True)
        picked = [
            i
            for i, (lo, hi) in enumerate(enc["offset_mapping"])
            if lo < r["answer_end"] and hi > r["answer_start"]
        ]
        n_prompt = len(tok(r["prompt"], add_special_tokens=False)["input_ids"])
        n_answer = len(tok(" " + r["answer"], add_special_tokens=False)["input_ids"])
        assert picked == list(range(n_prompt, n_prompt + n_answer)), r["text"]
    # Every attribute's values start with pairwise distinct tokens (next-token scoring can tell them apart).
    for a in (*FORGET_ATTRIBUTES.values(), *RETAIN_ATTRIBUTES.values(), *BENIGN_ATTRIBUTES.values()):
        first = [tok(" " + v, add_special_tokens=False)["input_ids"][0] for v in a.values]
        assert len(set(first)) == len(first), a.name


# ------------------------------------------------------------------------------------------------ DataSource
def test_datasource_loads_knowledge_splits():
    kw = {"n_forget": 12, "n_retain": 8, "seed": 2}
    recs = load_records(DataSource("knowledge:forget_A", knowledge=kw))
    assert [r["text"] for r in recs] == forget_A(**kw)
    assert {"text", "prompt", "response", "answer_start", "answer_end"} <= set(recs[0])
    # Mappings (YAML), filters on the metadata fields and select work as for any source.
    hosts = load_records({"path": "knowledge:forget_all", "knowledge": kw, "filter": {"attribute": "host"}})
    assert hosts and {r["attribute"] for r in hosts} == {"host"}
    assert len(load_records(DataSource("knowledge:retain", knowledge=kw, select="0:10"))) == 10
    assert load_records("knowledge:retain_domain")[0]["text"] == retain_domain()[0]
    # The prompt/response fields work as chat data (labels only on the response).
    tok = tiny_tokenizer()
    ex = tokenize_source(
        DataSource(
            "knowledge:forget_B", knowledge=kw, prompt_field="prompt", response_field="response", limit=4
        ),
        tok,
        seq_len=64,
    )
    assert len(ex) == 4 and all(-100 in e["labels"] and e["labels"][-1] != -100 for e in ex)
    plain = tokenize_source(DataSource("knowledge:forget_B", knowledge=kw, limit=2), tok, seq_len=64)
    assert plain[0]["labels"] == plain[0]["input_ids"]


def test_datasource_validation():
    with pytest.raises(ConfigError, match="unknown knowledge split"):
        DataSource("knowledge:forget_C")
    with pytest.raises(ConfigError, match="unknown keys"):
        DataSource("knowledge:forget_A", knowledge={"n": 3})
    with pytest.raises(ConfigError, match="n_forget"):
        DataSource("knowledge:forget_A", knowledge={"n_forget": 0})
    with pytest.raises(ConfigError, match="only used by"):
        DataSource("synthetic:retain", knowledge={"seed": 1})
    with pytest.raises(ConfigError, match="mapping"):
        DataSource("knowledge:retain", knowledge=[1])


def test_label_span_labels_only_the_answer_tokens():
    """DataSource.label_span restricts labels to a fact's answer (TAR's entropy at label positions)."""
    from tar_lightning.data import DataSource
    from tar_lightning.data.tokenize import tokenize_source
    from tar_lightning.models import tiny_tokenizer

    tok = tiny_tokenizer()
    source = DataSource(
        path="knowledge:forget_A",
        knowledge={"n_forget": 8, "n_retain": 4},
        label_span=["answer_start", "answer_end"],
        limit=20,
    )
    from tar_lightning.data import load_records

    records = load_records(source)
    examples = tokenize_source(source, tok, seq_len=64)
    assert len(examples) == len(records)
    for record, ex in zip(records, examples, strict=True):
        labelled = [t for t in ex["labels"] if t != -100]
        assert labelled, record["text"]
        assert tok.decode(labelled).strip() == record["answer"].strip()
        # labels sit where the ids are, the rest is ignored
        assert all(label in (-100, i) for label, i in zip(ex["labels"], ex["input_ids"], strict=True))


def test_label_span_bad_settings_are_clear_errors():
    import pytest

    from tar_lightning import ConfigError
    from tar_lightning.data import DataSource

    with pytest.raises(ConfigError, match="label_span"):
        DataSource(path="knowledge:forget_A", label_span=["answer_start"])
    with pytest.raises(ConfigError, match="label_span"):
        DataSource(path="x.jsonl", prompt_field="p", response_field="r", label_span=["a", "b"])


def test_stage0_schedule_warms_up_from_one_over_w_then_decays_to_the_floor():
    import math

    from tar_lightning.safeguards.sft import warmup_cosine

    f = warmup_cosine(steps=10, warmup=4, floor=0.1)
    assert [f(t) for t in range(4)] == [0.25, 0.5, 0.75, 1.0]  # (t + 1) / W, not HF's t / W
    assert f(4) == 1.0 and f(10) == pytest.approx(0.1) and f(50) == pytest.approx(0.1)
    assert f(7) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 3 / 6)))
    assert warmup_cosine(steps=5, warmup=0)(0) == 1.0
