"""Tests of the data package: readers, chat masking, synthetic data, bundles, sharding, resume, Lightning."""

from __future__ import annotations

import copy
import csv
import json
import logging
from pathlib import Path

import lightning
import numpy as np
import pytest
import torch

from tar_lightning.data import (
    DataSource,
    StepSampler,
    TARDataModule,
    load_records,
    select_range,
    synthetic_records,
    synthetic_texts,
    tokenize_source,
)
from tar_lightning.errors import ConfigError, DataError
from tar_lightning.models import tiny_tokenizer

SHARED_DATA = Path(__file__).parents[2] / "shared" / "data"

STEPS = {"retain": 1, "tr": 1, "forget": 4, "retain_domain": 4}


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


def _streams(n: int = 40) -> dict[str, DataSource]:
    return {
        "retain": DataSource("synthetic:retain", synthetic={"n": n}),
        "tr": DataSource("synthetic:forget", select="80%:", synthetic={"n": n}),
        "forget": DataSource("synthetic:forget", select="0:80%", synthetic={"n": n}),
        "retain_domain": DataSource("synthetic:retain_domain", synthetic={"n": n}),
    }


def _dm(tok, **kw) -> TARDataModule:
    kw.setdefault("streams", _streams())
    kw.setdefault("stream_steps", STEPS)
    kw.setdefault("seq_len", 48)
    kw.setdefault("batch_size", 4)
    dm = TARDataModule(tokenizer=tok, **kw)
    dm.setup("fit")
    return dm


def _examples(stream: dict[str, torch.Tensor], m: int) -> list[list[int]]:
    """Unpadded token lists of micro-batch ``m`` of one stream of a bundle."""
    ids, mask = stream["input_ids"][m], stream["attention_mask"][m]
    return [row[msk.bool()].tolist() for row, msk in zip(ids, mask, strict=True)]


# --------------------------------------------------------------------------------------------- readers
def test_txt_reader_one_record_per_nonempty_line(tmp_path):
    f = tmp_path / "a.txt"
    f.write_text("first line\n\n   \nsecond line\nthird\n", encoding="utf-8")
    assert [r["text"] for r in load_records(str(f))] == ["first line", "second line", "third"]


def test_json_list_and_wrapped(tmp_path):
    a, b = tmp_path / "list.json", tmp_path / "wrapped.json"
    a.write_text(json.dumps([{"text": "one", "k": 1}, {"text": "two", "k": 2}]))
    b.write_text(json.dumps({"data": [{"text": "three"}, {"text": "four"}]}))
    assert [r["text"] for r in load_records(str(a))] == ["one", "two"]
    assert load_records(str(a))[1]["k"] == 2
    assert [r["text"] for r in load_records(str(b))] == ["three", "four"]


def test_jsonl_csv_parquet_and_folder(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "1.jsonl").write_text('{"body": "alpha"}\n\n{"body": "beta"}\n')
    with open(tmp_path / "d" / "2.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["body", "n"])
        w.writerows([["gamma", 1], ["delta, with comma", 2]])
    pq.write_table(pa.table({"body": ["epsilon", "zeta"]}), tmp_path / "d" / "3.parquet")
    (tmp_path / "d" / "README").write_text("not data")
    for name, want in [("1.jsonl", ["alpha", "beta"]), ("2.csv", ["gamma", "delta, with comma"]),
                       ("3.parquet", ["epsilon", "zeta"])]:  # fmt: skip
        got = load_records(DataSource(str(tmp_path / "d" / name), text_field="body"))
        assert [r["body"] for r in got] == want
    folder = load_records(DataSource(str(tmp_path / "d"), text_field="body"))
    assert [r["body"] for r in folder] == ["alpha", "beta", "gamma", "delta, with comma", "epsilon", "zeta"]


def test_select_slices_partition(tmp_path):
    f = tmp_path / "n.jsonl"
    f.write_text("".join(json.dumps({"text": f"rec {i}"}) + "\n" for i in range(10)))
    head = load_records(DataSource(str(f), select="0:80%"))
    tail = load_records(DataSource(str(f), select="80%:"))
    assert [r["text"] for r in head] == [f"rec {i}" for i in range(8)]
    assert [r["text"] for r in tail] == ["rec 8", "rec 9"]
    assert [r["text"] for r in load_records(DataSource(str(f), select="2:5"))] == ["rec 2", "rec 3", "rec 4"]
    assert [r["text"] for r in load_records(DataSource(str(f), select="-2:"))] == ["rec 8", "rec 9"]
    assert len(load_records(DataSource(str(f), limit=3))) == 3
    assert list(select_range("0:33.3%", 7)) == [0, 1]
    for bad in ("80%", "a:b", "0:150%"):
        with pytest.raises(ConfigError, match="select"):
            DataSource(str(f), select=bad)


def test_min_chars_drops_are_logged(tmp_path, caplog):
    f = tmp_path / "m.csv"
    f.write_text("text,n\nlong enough,1\nab,2\n,3\nfine text,4\n")
    with caplog.at_level(logging.WARNING, logger="tar_lightning.data"):
        recs = load_records(DataSource(str(f), min_chars=5))
    assert [r["text"] for r in recs] == ["long enough", "fine text"]
    assert "dropped 2 of 4" in caplog.text and "min_chars=5" in caplog.text


@pytest.mark.shared_data("wikitext2/valid.txt")
def test_shared_wikitext_file():
    folder = SHARED_DATA / "wikitext2"
    recs = load_records(DataSource(str(folder / "valid.txt"), limit=50))
    assert len(recs) == 50 and all(r["text"].strip() for r in recs)
    examples = tokenize_source(DataSource(str(folder / "valid.txt"), limit=20), tiny_tokenizer(), seq_len=64)
    assert len(examples) == 20 and all(2 <= len(e["input_ids"]) <= 64 for e in examples)


# --------------------------------------------------------------------------------------------- chat
def test_chat_prompt_tokens_masked(tmp_path, tok):
    f = tmp_path / "sft.jsonl"
    rows = [
        {"instruction": "What is the flag of Uera?", "output": "The flag is red and blue."},
        {"instruction": "Name a river.", "output": "The river Zanro."},
    ]
    f.write_text("".join(json.dumps(r) + "\n" for r in rows))
    src = DataSource(str(f), prompt_field="instruction", response_field="output", system_prompt="Be brief.")
    examples = tokenize_source(src, tok, seq_len=128)
    assert len(examples) == 2
    for ex, row in zip(examples, rows, strict=True):
        ids, labels = ex["input_ids"], ex["labels"]
        first = next(i for i, t in enumerate(labels) if t != -100)
        assert all(t == -100 for t in labels[:first])
        assert labels[first:] == ids[first:]
        assert tok.decode(ids[first:]) == row["output"] + tok.eos_token
        prompt = tok.decode(ids[:first])
        assert row["instruction"] in prompt and "Be brief." in prompt and prompt.endswith("<|assistant|>\n")


def test_chat_messages_only_last_assistant_labelled(tmp_path, tok):
    f = tmp_path / "chat.json"
    msgs = [
        {"role": "user", "content": "Hi there"},
        {"role": "assistant", "content": "Hello."},
        {"role": "user", "content": "Which colour?"},
        {"role": "assistant", "content": "It is green."},
    ]
    f.write_text(json.dumps([{"messages": msgs}]))
    (ex,) = tokenize_source(DataSource(str(f), messages_field="messages"), tok, seq_len=128)
    labelled = [t for t in ex["labels"] if t != -100]
    assert tok.decode(labelled) == "It is green." + tok.eos_token
    assert "Hello." in tok.decode(ex["input_ids"])


def test_chat_needs_template(tmp_path):
    f = tmp_path / "sft.jsonl"
    f.write_text(json.dumps({"p": "q", "r": "a"}) + "\n")
    t = tiny_tokenizer()
    t.chat_template = None
    with pytest.raises(ConfigError, match="chat template"):
        tokenize_source(DataSource(str(f), prompt_field="p", response_field="r"), t, seq_len=32)


# --------------------------------------------------------------------------------------------- synthetic
def test_synthetic_deterministic_and_varied():
    a = synthetic_texts("forget", n=30, seed=1)
    assert a == synthetic_texts("forget", n=30, seed=1)
    assert a != synthetic_texts("forget", n=30, seed=2)
    assert synthetic_texts("forget", n=10, seed=1) == a[:10]
    assert len(set(a)) > 20
    retain, benign = synthetic_texts("retain", n=30), synthetic_texts("retain_domain", n=30)
    assert retain != benign and not set(retain) & set(a)
    assert any("receptor" in t for t in a) and not any("receptor" in t for t in benign)
    assert synthetic_records("retain", n=3) == [{"text": t} for t in retain[:3]]
    with pytest.raises(ConfigError, match="unknown synthetic domain"):
        DataSource("synthetic:weather")
    with pytest.raises(ConfigError, match="synthetic"):
        DataSource("synthetic:retain", synthetic={"size": 3})


# --------------------------------------------------------------------------------------------- bundles
def test_bundle_shapes_and_padding(tok):
    dm = _dm(tok)
    ds = dm.train_dataset()
    bundle = ds[0]
    assert list(bundle) == ["retain", "tr", "forget", "retain_domain"]
    for name, n in STEPS.items():
        s = bundle[name]
        L = s["input_ids"].shape[-1]
        for key in ("input_ids", "attention_mask", "labels"):
            assert s[key].shape == (n, 4, L) and s[key].dtype == torch.long
        assert L <= 48 and int(s["attention_mask"].sum(-1).max()) == L
        pad = s["attention_mask"] == 0
        assert (s["labels"][pad] == -100).all() and (s["input_ids"][pad] == tok.pad_token_id).all()
        assert (s["labels"][~pad] == s["input_ids"][~pad]).all()
    short = TARDataModule(
        {"retain": DataSource("synthetic:retain", synthetic={"n": 8})}, seq_len=200, batch_size=2,
        stream_steps={"retain": 1}, tokenizer=tok, pad_to="max_length",
    )  # fmt: skip
    short.setup("fit")
    b = short.train_dataset()[0]["retain"]
    assert b["input_ids"].shape == (1, 2, 200) and int(b["attention_mask"].sum(-1).max()) < 200


def test_bundles_deterministic_across_instances(tok):
    a, b = _dm(tok).train_dataset(), _dm(tok).train_dataset()
    c = _dm(tok, seed=1).train_dataset()
    for step in (0, 3, 17):
        for name in STEPS:
            for key in ("input_ids", "attention_mask", "labels"):
                assert torch.equal(a[step][name][key], b[step][name][key])
    assert not torch.equal(a[0]["forget"]["input_ids"], c[0]["forget"]["input_ids"])


def test_one_rank_b4_equals_two_ranks_b2(tok):
    one = _dm(tok, batch_size=4).train_dataset(0, 1)
    dm2 = _dm(tok, batch_size=2)
    r0, r1 = dm2.train_dataset(0, 2), dm2.train_dataset(1, 2)
    assert dm2.steps_per_epoch_for(2) == _dm(tok, batch_size=4).steps_per_epoch_for(1)
    for step in range(12):
        for name, n in STEPS.items():
            full = np.concatenate([r0.record_indices(name, step), r1.record_indices(name, step)], axis=1)
            assert np.array_equal(one.record_indices(name, step), full)
            for m in range(n):
                assert _examples(one[step][name], m) == (
                    _examples(r0[step][name], m) + _examples(r1[step][name], m)
                )


def test_epoch_wrap_gives_new_permutation(tok):
    dm = _dm(tok, streams={"retain": DataSource("synthetic:retain", synthetic={"n": 10})}, batch_size=2,
             stream_steps={"retain": 1})  # fmt: skip
    ds = dm.train_dataset()
    assert dm.steps_per_epoch_for(1) == 5
    e0 = np.concatenate([ds.record_indices("retain", s)[0] for s in range(5)])
    e1 = np.concatenate([ds.record_indices("retain", s)[0] for s in range(5, 10)])
    assert sorted(e0) == list(range(10)) and sorted(e1) == list(range(10))
    assert not np.array_equal(e0, e1)


def test_sampler_epochs_and_resume(tok):
    sampler = StepSampler(3)
    assert isinstance(sampler, torch.utils.data.distributed.DistributedSampler) and len(sampler) == 3
    unused = iter(sampler)  # created and dropped without a step taken: does not count as a pass
    del unused
    passes = []
    for epoch in range(3):
        sampler.set_epoch(epoch)
        passes.append(list(sampler))
    assert passes == [[0, 1, 2], [3, 4, 5], [6, 7, 8]]
    resumed = StepSampler(3, start_step=5)
    resumed.set_epoch(7)  # Lightning's epoch number after a resume need not match the data epoch
    assert list(resumed) == [5] and list(resumed) == [6, 7, 8]

    def run(dm, steps):
        out, epoch = [], 0
        loader = dm.train_dataloader()
        while len(out) < steps:
            loader.sampler.set_epoch(epoch)
            out.extend(loader)
            epoch += 1
        return out[:steps]

    kw = dict(streams={"retain": DataSource("synthetic:retain", synthetic={"n": 6}),
                       "forget": DataSource("synthetic:forget", synthetic={"n": 6})},
              stream_steps={"retain": 1, "forget": 2}, batch_size=2)  # fmt: skip
    full = run(_dm(tok, **kw), 8)
    dm = _dm(tok, **kw)
    assert dm.state_dict() == {"next_step": 0}
    dm.load_state_dict({"next_step": 5})
    assert dm.state_dict() == {"next_step": 5}
    first = next(iter(dm.train_dataloader()))
    for name in ("retain", "forget"):
        for key in ("input_ids", "labels", "attention_mask"):
            assert torch.equal(first[name][key], full[5][name][key])
    with pytest.raises(ConfigError, match="next_step"):
        dm.load_state_dict({"step": 1})


def test_val_dataloaders(tok):
    dm = _dm(tok, val_streams={"wiki": DataSource("synthetic:retain", synthetic={"n": 5, "seed": 9})},
             stream_batch_sizes={"wiki": 2}, seq_len=256)  # fmt: skip
    (loader,) = dm.val_dataloader()
    batches = list(loader)
    assert [b["input_ids"].shape[0] for b in batches] == [2, 2, 1]
    assert batches[0]["input_ids"].dim() == 2
    texts = synthetic_texts("retain", n=5, seed=9)
    assert (
        tok.decode(batches[0]["input_ids"][0][batches[0]["attention_mask"][0].bool()])
        == texts[0] + tok.eos_token
    )
    assert _dm(tok).val_dataloader() == []
    described = dm.describe()
    assert described["retain"]["records"] == 40 and described["forget"]["records"] == 32
    assert described["tr"]["records"] == 8 and described["val/wiki"]["records"] == 5


# --------------------------------------------------------------------------------------------- Lightning
class _TinyModule(lightning.LightningModule):
    def __init__(self, tokenizer, steps):
        super().__init__()
        self.tokenizer = tokenizer
        self._steps = dict(steps)
        self.emb = torch.nn.EmbeddingBag(len(tokenizer), 8, mode="sum")
        self.head = torch.nn.Linear(8, 1)
        self.seen: list[dict] = []

    def stream_steps(self) -> dict[str, int]:
        return dict(self._steps)

    def training_step(self, batch, batch_idx):
        self.seen.append({k: {kk: vv.clone() for kk, vv in v.items()} for k, v in batch.items()})
        loss = torch.zeros(())
        for stream in batch.values():
            ids = stream["input_ids"].flatten(0, 1)
            mask = stream["attention_mask"].flatten(0, 1).float()
            loss = loss + self.head(self.emb(ids, per_sample_weights=mask)).pow(2).mean()
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


def _trainer(tmp_path, max_steps, **kw):
    kw.setdefault("enable_checkpointing", False)
    return lightning.Trainer(
        max_steps=max_steps, accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
        enable_model_summary=False, default_root_dir=tmp_path, **kw,
    )  # fmt: skip


def _small_streams():
    return {
        "retain": DataSource("synthetic:retain", synthetic={"n": 8}),
        "forget": DataSource("synthetic:forget", synthetic={"n": 8}),
        "unused": DataSource("synthetic:retain_domain", synthetic={"n": 4}),
    }


def _assert_steps(seen, reference, steps):
    assert len(seen) == len(steps)
    for s, batch in zip(steps, seen, strict=True):
        assert set(batch) == {"retain", "forget"}
        for name in ("retain", "forget"):
            for key in ("input_ids", "attention_mask", "labels"):
                assert torch.equal(batch[name][key], reference[s][name][key]), (s, name, key)


@pytest.mark.parametrize("num_workers", [0, 1])
def test_lightning_fit_consumes_bundles_and_resumes(tmp_path, tok, num_workers):
    steps = {"retain": 1, "forget": 3}
    reference = _dm(
        tok, streams=_small_streams(), stream_steps=steps, batch_size=4, seq_len=32
    ).train_dataset()

    def datamodule():  # tokenizer and stream_steps come from the module
        return TARDataModule(_small_streams(), seq_len=32, batch_size=4, num_workers=num_workers)

    model, dm = _TinyModule(tok, steps), datamodule()
    every_step = lightning.pytorch.callbacks.ModelCheckpoint(
        dirpath=tmp_path / "ck", every_n_train_steps=1, save_top_k=-1, filename="{step}"
    )
    trainer = _trainer(tmp_path, 3, callbacks=[every_step], enable_checkpointing=True)
    trainer.fit(model, datamodule=dm)
    assert isinstance(trainer.train_dataloader.sampler, StepSampler)  # not wrapped by Lightning
    assert dm.steps_per_epoch_for(1) == 2  # so the 3 steps crossed an epoch boundary
    assert model.seen[0]["retain"]["input_ids"].shape[:2] == (1, 4)
    assert model.seen[0]["forget"]["input_ids"].shape[:2] == (3, 4)
    _assert_steps(model.seen, reference, [0, 1, 2])
    assert dm.state_dict() == {"next_step": 3}
    end_ckpt = tmp_path / "end.ckpt"
    trainer.save_checkpoint(end_ckpt)
    assert torch.load(end_ckpt, weights_only=False)["TARDataModule"] == {"next_step": 3}

    # Written at batch end mid-epoch, at the end of an epoch, and after max_steps stopped the run mid-epoch:
    # Lightning's loop state differs in each, the data must continue at the next outer step every time.
    for ckpt, first in [
        (tmp_path / "ck" / "step=2.ckpt", 2),
        (tmp_path / "ck" / "step=3.ckpt", 3),
        (end_ckpt, 3),
    ]:
        model2, dm2 = _TinyModule(tok, steps), datamodule()
        _trainer(tmp_path, 5).fit(model2, datamodule=dm2, ckpt_path=ckpt)
        _assert_steps(model2.seen, reference, list(range(first, 5)))
        assert dm2.state_dict() == {"next_step": 5}


def test_lightning_does_not_wrap_step_sampler_under_ddp(tok):
    trainer = lightning.Trainer(accelerator="cpu", devices=2, strategy="ddp", logger=False)
    dm = _dm(tok)
    loader = dm.train_dataloader()
    plain = torch.utils.data.DataLoader(list(range(4)))
    connector = trainer._data_connector
    assert connector._requires_distributed_sampler(plain)  # control: an ordinary loader would be wrapped
    assert not connector._requires_distributed_sampler(loader)
    from lightning.pytorch.trainer.states import RunningStage

    assert connector._prepare_dataloader(loader, shuffle=True, mode=RunningStage.TRAINING) is loader


# --------------------------------------------------------------------------------------------- errors
def test_missing_file(tmp_path):
    missing = tmp_path / "nope" / "train.jsonl"
    with pytest.raises(DataError, match="not found") as info:
        load_records(str(missing))
    assert str(missing) in str(info.value)


def test_missing_text_field_lists_fields(tmp_path):
    f = tmp_path / "q.jsonl"
    f.write_text(json.dumps({"question": "q", "answer": "a"}) + "\n")
    with pytest.raises(DataError) as info:
        load_records(DataSource(str(f), text_field="content"))
    msg = str(info.value)
    assert "'content'" in msg and "question" in msg and "answer" in msg and str(f) in msg


def test_malformed_json_line_numbers(tmp_path):
    f = tmp_path / "bad.jsonl"
    f.write_text('{"text": "a"}\n{"text": "b"}\n{"text": "c",}\n{"text": "d"}\n')
    with pytest.raises(DataError, match=r"line 3") as info:
        load_records(str(f))
    assert str(f) in str(info.value)
    g = tmp_path / "bad.json"
    g.write_text('[\n  {"text": "a"},\n  {"text": "b"\n]\n')
    with pytest.raises(DataError, match=r"bad\.json: line 4"):
        load_records(str(g))
    h = tmp_path / "empty.csv"
    h.write_text("text\n\n")
    with pytest.raises(DataError, match="no records"):
        load_records(str(h))


def test_required_stream_missing(tok):
    dm = TARDataModule(
        {"retain": "synthetic:retain", "tr": "synthetic:forget"}, tokenizer=tok, stream_steps=STEPS
    )
    with pytest.raises(ConfigError, match="forget") as info:
        dm.setup("fit")
    assert "configured streams: ['retain', 'tr']" in str(info.value)
    with pytest.raises(ConfigError, match="stream_steps"):
        TARDataModule({"retain": "synthetic:retain"}, tokenizer=tok).setup("fit")
    with pytest.raises(ConfigError, match="tokenizer"):
        TARDataModule({"retain": "synthetic:retain"}, stream_steps={"retain": 1}).setup("fit")
    with pytest.raises(ConfigError, match="unknown keys"):
        TARDataModule({"retain": {"path": "synthetic:retain", "txt_field": "x"}})


def test_tokenizer_without_pad_token(tok):
    t = copy.deepcopy(tok)
    t.pad_token = None
    assert t.pad_token_id is None
    with pytest.raises(ConfigError, match="pad token"):
        TARDataModule({"retain": "synthetic:retain"}, tokenizer=t, stream_steps={"retain": 1}).setup("fit")
    with pytest.raises(ConfigError, match="pad token"):
        tokenize_source("synthetic:retain", t, seq_len=16)
    assert tok.pad_token_id is not None


def test_hub_errors_are_wrapped(monkeypatch):
    import datasets

    def offline(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'org/corpus' on the Hub (LocalEntryNotFoundError)")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(DataError, match="cannot load hub dataset 'org/corpus'") as info:
        load_records(DataSource("org/corpus", name="cfg", split="test"))
    assert "split='test'" in str(info.value) and "Couldn't reach" in str(info.value)


def test_gzipped_jsonl(tmp_path):
    import gzip

    f = tmp_path / "c.jsonl.gz"
    with gzip.open(f, "wt", encoding="utf-8") as fh:
        fh.write('{"text": "zipped one"}\n{"text": "zipped two"}\n')
    assert [r["text"] for r in load_records(str(f))] == ["zipped one", "zipped two"]


# --------------------------------------------------------------------------------------------- filter
def _labelled(tmp_path) -> Path:
    """A Pile-bio-like labelled corpus: 10 records, ``label`` true for the odd ones."""
    f = tmp_path / "labelled.jsonl"
    f.write_text(
        "".join(
            json.dumps({"txt_chunk": f"rec {i}", "label": i % 2 == 1, "topic": "bio"}) + "\n"
            for i in range(10)
        )
    )
    return f


def test_filter_keeps_matching_records_and_logs_drops(tmp_path, caplog):
    f = _labelled(tmp_path)
    with caplog.at_level(logging.INFO, logger="tar_lightning.data"):
        forget = load_records(DataSource(str(f), text_field="txt_chunk", filter={"label": True}))
    assert [r["txt_chunk"] for r in forget] == [f"rec {i}" for i in (1, 3, 5, 7, 9)]
    assert "kept 5 of 10" in caplog.text and "dropped 5" in caplog.text
    retain = load_records(DataSource(str(f), text_field="txt_chunk", filter={"label": False}))
    assert [r["txt_chunk"] for r in retain] == [f"rec {i}" for i in (0, 2, 4, 6, 8)]
    # Several keys: all must match.
    both = load_records(DataSource(str(f), text_field="txt_chunk", filter={"label": True, "topic": "bio"}))
    assert len(both) == 5
    # An empty filter keeps everything.
    assert len(load_records(DataSource(str(f), text_field="txt_chunk", filter={}))) == 10


def test_filter_applies_before_select_and_limit(tmp_path):
    f = _labelled(tmp_path)
    head = load_records(DataSource(str(f), text_field="txt_chunk", filter={"label": True}, select="0:80%"))
    tail = load_records(DataSource(str(f), text_field="txt_chunk", filter={"label": True}, select="80%:"))
    # 80% of the 5 matching records, not of the 10 read: the halves partition the forget records.
    assert [r["txt_chunk"] for r in head] == ["rec 1", "rec 3", "rec 5", "rec 7"]
    assert [r["txt_chunk"] for r in tail] == ["rec 9"]
    limited = load_records(DataSource(str(f), text_field="txt_chunk", filter={"label": False}, limit=2))
    assert [r["txt_chunk"] for r in limited] == ["rec 0", "rec 2"]


def test_filter_on_folders_and_synthetic_sources(tmp_path):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "a.jsonl").write_text('{"text": "a0", "k": 0}\n{"text": "a1", "k": 1}\n')
    (tmp_path / "d" / "b.jsonl").write_text(
        '{"text": "b0", "k": 0}\n{"text": "b1", "k": 1}\n{"text": "b2", "k": 1}\n'
    )
    got = load_records(DataSource(str(tmp_path / "d"), filter={"k": 1}, select="1:"))
    assert [r["text"] for r in got] == ["b1", "b2"]
    # Synthetic records are plain lists of dicts: the same filter path applies.
    recs = load_records(DataSource("synthetic:forget", synthetic={"n": 20}))
    value = recs[0]["text"]
    assert [
        r["text"]
        for r in load_records(DataSource("synthetic:forget", synthetic={"n": 20}, filter={"text": value}))
    ] == [r["text"] for r in recs if r["text"] == value]


def test_filter_unknown_key_names_key_source_and_fields(tmp_path):
    f = _labelled(tmp_path)
    with pytest.raises(DataError) as info:
        load_records(DataSource(str(f), text_field="txt_chunk", filter={"lable": True}))
    msg = str(info.value)
    assert "'lable'" in msg and str(f) in msg
    assert "available fields: ['label', 'topic', 'txt_chunk']" in msg


def test_filter_matching_nothing_shows_values(tmp_path):
    f = _labelled(tmp_path)
    with pytest.raises(DataError, match="no record matches filter") as info:
        load_records(DataSource(str(f), text_field="txt_chunk", filter={"label": "true"}))
    assert "True" in str(info.value) and "False" in str(info.value)


def test_filter_must_be_a_mapping_and_parses_from_yaml_mappings(tmp_path):
    with pytest.raises(ConfigError, match="'filter' must be a mapping"):
        DataSource("x.jsonl", filter=["label"])
    with pytest.raises(ConfigError, match="'filter' keys"):
        DataSource("x.jsonl", filter={"": 1})
    f = _labelled(tmp_path)
    dm = TARDataModule(
        {"retain": {"path": str(f), "text_field": "txt_chunk", "filter": {"label": False}}},
        tokenizer=tiny_tokenizer(),
        stream_steps={"retain": 1},
        batch_size=2,
    )
    dm.setup("fit")
    assert len(dm.pools["retain"]) == 5
    assert "filter={'label': False}" in DataSource(str(f), filter={"label": False}).label()
