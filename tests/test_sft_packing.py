"""SFT's stream is laid out for its training windows: every conversation lies whole in one window, so no answer is
trained without the question (or tool result) it answers from."""

import random

import numpy as np

from leanseek.train.loader import WindowSampler
from leanseek.train.sft import windowed

PAD = 2


def pieces(rng, n, seq_len):
    """n (ids, flags) conversations: ids tagged by conversation (c * 1000 + position), a few longer than a window."""
    out = []
    for c in range(n):
        length = rng.choice([rng.randint(3, seq_len // 2), rng.randint(seq_len // 2, seq_len),
                             rng.randint(seq_len + 1, 3 * seq_len)] if c % 17 == 0 else
                            [rng.randint(3, seq_len // 2), rng.randint(seq_len // 2, seq_len)])
        out.append(([10_000 + c * 1000 + i for i in range(length)], [i % 2 == 1 for i in range(length)]))
    return out


def test_each_conversation_lies_whole_in_one_window():
    rng = random.Random(0)
    for seq_len in (16, 64, 128):
        convs = pieces(rng, 300, seq_len)
        laid = windowed([(list(i), list(m)) for i, m in convs], seq_len, PAD)
        ids = np.array([t for w, _ in laid for t in w])
        flags = np.array([f for _, m in laid for f in m])
        assert all(len(w) == seq_len for w, _ in laid[:-1]) and 0 < len(laid[-1][0]) <= seq_len
        assert not flags[ids == PAD].any()  # padding is never learned
        for c, (conv_ids, conv_flags) in enumerate(convs):
            start = int(np.flatnonzero(ids == conv_ids[0])[0])
            assert ids[start:start + len(conv_ids)].tolist() == conv_ids  # contiguous, nothing lost
            assert flags[start:start + len(conv_ids)].tolist() == conv_flags
            if len(conv_ids) <= seq_len:
                assert start // seq_len == (start + len(conv_ids) - 1) // seq_len  # one window
            else:
                assert start % seq_len == 0  # a longer one starts a window
        assert (ids != PAD).sum() == sum(len(i) for i, _ in convs)
        assert (ids == PAD).sum() < 0.1 * len(ids)  # first fit leaves little padding


def test_the_sampler_reads_whole_conversations():
    rng = random.Random(1)
    seq_len = 32
    convs = pieces(rng, 200, seq_len)
    convs = [(i, m) for i, m in convs if len(i) <= seq_len]
    laid = windowed(convs, seq_len, PAD)
    ids = np.array([t for w, _ in laid for t in w], dtype=np.int32)
    flags = np.array([f for _, m in laid for f in m])
    sampler = WindowSampler(ids, seq_len, batch_size=8, seed=0, mask=flags)
    starts = {i[0]: i for i, _ in convs}
    for step in range(5):
        for x, _ in sampler.micro_batches(step, 0, 1, 1):
            for row in x.tolist():
                heads = [k for k, t in enumerate(row) if t in starts]
                for k in heads:
                    conv = starts[row[k]]
                    assert row[k:k + len(conv)] == conv  # every conversation a window starts is whole in it
                first = row[0]
                assert first == PAD or first in starts  # a window never begins mid-conversation
