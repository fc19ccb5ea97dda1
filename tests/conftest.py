import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

# Tiny models run several times faster on one thread than on two on this kind of shared 2-core machine.
torch.set_num_threads(1)


def random_bundle(vocab_size: int, steps: dict[str, int], batch: int = 2, length: int = 12, seed: int = 0,
                  pad_last: int = 3) -> dict:
    """A TAR batch of random token streams ``{name: {input_ids, attention_mask, labels}: [n, b, L]}``.

    The last sequence of every micro-batch ends with ``pad_last`` padding positions (labels -100).
    """
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, n in steps.items():
        ids = torch.randint(3, vocab_size, (n, batch, length), generator=g)
        mask = torch.ones_like(ids)
        if pad_last:
            mask[:, -1, -pad_last:] = 0
            ids[:, -1, -pad_last:] = 0
        labels = ids.masked_fill(mask == 0, -100)
        out[name] = {"input_ids": ids, "attention_mask": mask, "labels": labels}
    return out


@pytest.fixture
def bundle_factory():
    return random_bundle
