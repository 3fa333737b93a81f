"""GGUF export for llama.cpp. Without llama.cpp here, the file is checked against llama.cpp's documented reading of
it: a forward pass written from llama.cpp's deepseek2 graph (absorbed MLA over attn_k_b / attn_v_b, its expert
routing) on the tensors read back from the file must give leanseek's logits, and llama.cpp's split for the
pre-tokenizer type written ("smollm": \\p{N}, then GPT-2's regex) must cut text where leanseek's tokenizer does.
With llama-cpp-python installed, llama.cpp itself loads the file (test_llama_cpp_*)."""

import importlib.util
import random

import pytest
import torch
import torch.nn.functional as F
from tokenizers import Tokenizer, pre_tokenizers

import leanseek
from conftest import randomise, small_config, yarn
from leanseek.data.tokenizer import TextTokenizer, _pre_tokenizer, train_tokenizer

gguf = pytest.importorskip("gguf")
from leanseek.train.gguf import PRE_TOKENIZER, write_gguf  # noqa: E402


@pytest.fixture(scope="module")
def tok():
    text = "The cat sat on the mat. What does 'harbor' mean? 12 + 34 = 46. def f(x):\n    return x  *  2\n"
    return train_tokenizer(iter([text] * 50), 300)


def read(path):
    """name -> float32 tensor in PyTorch's shape, and the metadata fields as Python values."""
    reader = gguf.GGUFReader(str(path))
    tensors = {}
    for t in reader.tensors:
        data = gguf.quants.dequantize(t.data, t.tensor_type)
        tensors[t.name] = torch.from_numpy(data.reshape(list(reversed([int(n) for n in t.shape]))).copy()).float()
    fields = {}
    for name, field in reader.fields.items():
        if not field.types or field.types[0] == gguf.GGUFValueType.ARRAY:
            continue
        value = field.parts[field.data[0]]
        fields[name] = bytes(value).decode() if field.types[0] == gguf.GGUFValueType.STRING else value.item()
    return tensors, fields, reader


def rms(x, w, eps):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


def rope_pairs(x, positions, theta, dim, scale=1.0):
    """llama.cpp's NORM rope: rotate consecutive pairs (x[2i], x[2i+1]) by position x theta^(-2i/dim)."""
    freqs = scale / theta ** (torch.arange(0, dim, 2).float() / dim)
    angle = positions[:, None].float() * freqs  # [T, dim/2]
    cos, sin = angle.cos()[:, None], angle.sin()[:, None]
    a, b = x[..., 0::2], x[..., 1::2]
    return torch.stack([a * cos - b * sin, a * sin + b * cos], -1).flatten(-2)


def llama_cpp_forward(t, f, ids):
    """Logits of a deepseek2 GGUF's tensors as llama.cpp's graph computes them (no YaRN)."""
    arch = "deepseek2."
    H, eps = f[arch + "attention.head_count"], f[arch + "attention.layer_norm_rms_epsilon"]
    rope, kv_lora = f[arch + "rope.dimension_count"], f[arch + "attention.kv_lora_rank"]
    qk = f[arch + "attention.key_length_mla"]
    nope, dense = qk - rope, f[arch + "leading_dense_block_count"]
    k_used, groups = f[arch + "expert_used_count"], f.get(arch + "expert_group_count", 1)
    groups_used = f.get(arch + "expert_group_used_count", groups)
    T = len(ids)
    pos = torch.arange(T)
    x = t["token_embd.weight"][torch.tensor(ids)]
    causal = torch.full((T, T), float("-inf")).triu(1)
    for i in range(f[arch + "block_count"]):
        w = {k.removeprefix(f"blk.{i}."): v for k, v in t.items() if k.startswith(f"blk.{i}.")}
        h = rms(x, w["attn_norm.weight"], eps)
        if f[arch + "attention.q_lora_rank"]:
            q = rms(h @ w["attn_q_a.weight"].T, w["attn_q_a_norm.weight"], eps) @ w["attn_q_b.weight"].T
        else:
            q = h @ w["attn_q.weight"].T
        q = q.view(T, H, qk)
        q_nope, q_pe = q[..., :nope], rope_pairs(q[..., nope:], pos, f[arch + "rope.freq_base"], rope)
        kv = h @ w["attn_kv_a_mqa.weight"].T
        latent = rms(kv[:, :kv_lora], w["attn_kv_a_norm.weight"], eps)
        k_pe = rope_pairs(kv[:, None, kv_lora:], pos, f[arch + "rope.freq_base"], rope)[:, 0]
        q_latent = torch.einsum("thn,hcn->thc", q_nope, w["attn_k_b.weight"])  # wk_b: {nope, kv_lora, H}
        scores = (torch.einsum("thc,sc->hts", q_latent, latent) + torch.einsum("thr,sr->hts", q_pe, k_pe)) / qk ** 0.5
        o = torch.einsum("hts,sc->thc", torch.softmax(scores + causal, -1), latent)
        o = torch.einsum("thc,hjc->thj", o, w["attn_v_b.weight"])  # wv_b: {kv_lora, v, H}
        x = x + o.reshape(T, -1) @ w["attn_output.weight"].T
        h = rms(x, w["ffn_norm.weight"], eps)
        if i < dense:
            x = x + (F.silu(h @ w["ffn_gate.weight"].T) * (h @ w["ffn_up.weight"].T)) @ w["ffn_down.weight"].T
            continue
        probs = torch.sigmoid(h @ w["ffn_gate_inp.weight"].T)  # [T, E]
        biased = probs + w["exp_probs_b.bias"]
        E = probs.shape[-1]
        if groups > 1:  # a group's score: the sum of its two best biased scores
            g = biased.view(T, groups, E // groups).topk(2, -1).values.sum(-1)
            keep = torch.zeros_like(g, dtype=torch.bool).scatter(1, g.topk(groups_used, -1).indices, True)
            biased = biased.masked_fill(~keep.repeat_interleave(E // groups, 1), float("-inf"))
        chosen = biased.topk(k_used, -1).indices
        weights = probs.gather(1, chosen)
        if f.get(arch + "expert_weights_norm"):
            weights = weights / weights.sum(-1, keepdim=True)
        weights = weights * f[arch + "expert_weights_scale"]
        out = torch.zeros_like(h)
        for row in range(T):
            for e, wt in zip(chosen[row].tolist(), weights[row]):
                a = F.silu(w["ffn_gate_exps.weight"][e] @ h[row]) * (w["ffn_up_exps.weight"][e] @ h[row])
                out[row] += wt * (w["ffn_down_exps.weight"][e] @ a)
        shared = F.silu(h @ w["ffn_gate_shexp.weight"].T) * (h @ w["ffn_up_shexp.weight"].T)
        x = x + out + shared @ w["ffn_down_shexp.weight"].T
    return rms(x, t["output_norm.weight"], eps) @ t["output.weight"].T


@pytest.mark.parametrize("overrides", [{}, {"q_lora_rank": None, "n_group": 1, "topk_group": 1}])
def test_llama_cpp_graph_on_the_file_gives_leanseeks_logits(tmp_path, tok, overrides):
    fields = {"vocab_size": tok.vocab_size + 5, "n_group": 4, "topk_group": 2, "num_nextn_predict_layers": 1}
    model = randomise(leanseek.Transformer(small_config(**{**fields, **overrides})))
    path = tmp_path / "m.gguf"
    written = write_gguf(model, tok, path, "f32")
    t, f, _ = read(path)
    assert f["general.architecture"] == "deepseek2" and written["types"] == {"F32": len(t)}
    assert f["deepseek2.block_count"] == model.cfg.num_hidden_layers  # the MTP module is not written
    assert not any("nextn" in name or f"blk.{model.cfg.num_hidden_layers}." in name for name in t)
    rng = random.Random(0)
    ids = [rng.randrange(tok.vocab_size) for _ in range(12)]
    with torch.no_grad():
        want = model(torch.tensor([ids]))[0]
    got = llama_cpp_forward(t, f, ids)
    assert (got - want).abs().max() < 1e-4


def test_quantised_types_and_what_stays_float32(tmp_path, tok):
    model = randomise(leanseek.Transformer(small_config(vocab_size=tok.vocab_size, hidden_size=64,
                                                        moe_intermediate_size=32)))
    write_gguf(model, tok, tmp_path / "f32.gguf", "f32")
    f32 = read(tmp_path / "f32.gguf")[0]
    # q4_0: steps of a 32-value block's largest magnitude / 8, from -8 to +7 steps toward it: the far end is cut
    # by one step, so at most 1/8 of it off
    for outtype, tolerance in (("f16", 1e-3), ("q8_0", 2e-2), ("q4_0", 1 / 8 + 1e-3)):
        path = tmp_path / f"{outtype}.gguf"
        write_gguf(model, tok, path, outtype)
        t, f, reader = read(path)
        kinds = {x.name: x.tensor_type.name for x in reader.tensors}
        for name, kind in kinds.items():
            if name.endswith(("_norm.weight", ".bias")) or ".ffn_gate_inp." in name:
                assert kind == "F32", name
            elif outtype != "f16":
                # a block holds 32 values of a row: shorter rows (attn_k_b's 8 here) fall back to f16
                assert kind == (outtype.upper() if f32[name].shape[-1] % 32 == 0 else "F16"), name
            else:
                assert kind == "F16", name
            scale = f32[name].abs().max()
            assert (t[name] - f32[name]).abs().max() <= tolerance * scale, name
        assert f["general.file_type"] == {"f16": 1, "q8_0": 7, "q4_0": 2}[outtype]
    assert kinds["blk.1.ffn_gate_exps.weight"] == "Q4_0" and kinds["blk.0.attn_k_b.weight"] == "F16"


def test_export_reads_a_layer_at_a_time_and_writes_the_same_file(tmp_path, tok):
    """`leanseek export --gguf` reads the checkpoint a decoder layer at a time (load_hf_streamed), so a model larger
    than memory exports; the file is byte for byte the one written from the whole model in memory."""
    from leanseek.cli import main
    from leanseek.model.hf import load_hf_streamed

    cfg = small_config(vocab_size=tok.vocab_size, num_hidden_layers=3, num_nextn_predict_layers=1)
    folder = tmp_path / "run"
    leanseek.save_hf(randomise(leanseek.Transformer(cfg)), folder, max_shard_size="100KB")
    tok.save(folder)
    whole = leanseek.load_hf(folder)
    model, layers = load_hf_streamed(folder)
    assert all(p.is_meta for p in model.mtp.parameters())  # not read: llama.cpp does not run MTP
    assert torch.equal(model.embed_tokens.weight, whole.embed_tokens.weight)
    for i, layer in enumerate(layers):  # one layer holds weights at a time; the others stay on the meta device
        assert [not any(p.is_meta for p in x.parameters()) for x in model.layers] == [j == i for j in range(3)]
        assert all(torch.equal(a, b) for a, b in zip(layer.state_dict().values(),
                                                     whole.layers[i].state_dict().values()))
    assert all(p.is_meta for p in model.layers.parameters())
    for outtype in ("f32", "q8_0", "q4_0"):
        main(["export", str(folder), "--gguf", str(tmp_path / "streamed.gguf"), "--outtype", outtype])
        write_gguf(whole, tok, tmp_path / "whole.gguf", outtype, name="run")
        assert (tmp_path / "streamed.gguf").read_bytes() == (tmp_path / "whole.gguf").read_bytes(), outtype


def test_metadata_tokenizer_and_refusals(tmp_path, tok):
    model = randomise(leanseek.Transformer(small_config(vocab_size=tok.vocab_size + 3, rope_scaling=yarn(mscale=0.7),
                                                        n_group=4, topk_group=4)))
    write_gguf(model, tok, tmp_path / "m.gguf")
    _, f, reader = read(tmp_path / "m.gguf")
    assert f["tokenizer.ggml.model"] == "gpt2" and f["tokenizer.ggml.pre"] == PRE_TOKENIZER
    assert "deepseek2.expert_group_count" not in f  # llama.cpp refuses topk_group == n_group (no grouping anyway)
    assert f["deepseek2.attention.head_count_kv"] == 1 and f["deepseek2.expert_gating_func"] == 2
    assert f["deepseek2.rope.scaling.yarn_log_multiplier"] == pytest.approx(0.07)
    tokens = reader.fields["tokenizer.ggml.tokens"]
    types = reader.fields["tokenizer.ggml.token_type"]
    listed = [bytes(tokens.parts[i]).decode() for i in tokens.data]
    kinds = [int(types.parts[i][0]) for i in types.data]
    assert len(listed) == model.cfg.vocab_size and listed[-1] == f"[PAD{model.cfg.vocab_size - 1}]"
    assert listed[tok.token_id("<|end|>")] == "<|end|>" and kinds[tok.token_id("<|end|>")] == gguf.TokenType.CONTROL
    assert f["tokenizer.ggml.eot_token_id"] == tok.token_id("<|end|>")
    ids = tok.encode(" the cat")  # byte-level spellings, as in tokenizer.json
    assert "".join(listed[i] for i in ids) == "ĠtheĠcat" and {kinds[i] for i in ids} == {gguf.TokenType.NORMAL}

    foreign = TextTokenizer(Tokenizer.from_str(tok.tk.to_str()))
    foreign.tk.pre_tokenizer = pre_tokenizers.ByteLevel()  # GPT-2's split: digits in runs
    with pytest.raises(ValueError, match="convert_hf_to_gguf"):
        write_gguf(model, foreign, tmp_path / "foreign.gguf")

    v2 = randomise(leanseek.Transformer(small_config(vocab_size=tok.vocab_size, scoring_func="softmax",
                                                     topk_method="group_limited_greedy", n_group=4, topk_group=2)))
    with pytest.raises(ValueError, match="group_limited_greedy"):
        write_gguf(v2, tok, tmp_path / "v2.gguf")
    assert not (tmp_path / "v2.gguf").exists() and not list(tmp_path.glob(".v2.gguf.tmp*"))
    v32 = leanseek.Transformer(small_config(vocab_size=tok.vocab_size, index_n_heads=4, index_head_dim=16))
    with pytest.raises(ValueError, match="no sparse attention"):
        write_gguf(v32, tok, tmp_path / "v32.gguf")


@pytest.mark.skipif(importlib.util.find_spec("regex") is None, reason="needs the regex package")
def test_llama_cpp_pre_tokenizer_splits_as_leanseek_does():
    """llama.cpp applies its type's regexes in turn, each to the pieces the last one left, keeping unmatched text as
    pieces; for "smollm" they are \\p{N} then GPT-2's (llama-vocab.cpp). Checked on the built-in corpus's text and
    on random strings of letters, digits of several scripts, spaces, contractions and symbols."""
    import regex

    from leanseek.data.sources import collect

    gpt2 = regex.compile(r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+""")

    def split(pieces, pattern):
        out = []
        for piece in pieces:
            at = 0
            for m in pattern.finditer(piece):
                out += [piece[at:m.start()]] * (m.start() > at) + [m.group()]
                at = m.end()
            out += [piece[at:]] * (at < len(piece))
        return out

    docs, _ = collect(["builtin:python-docstrings"], max_chars=300_000)
    rng = random.Random(0)
    alphabet = list("ab Zq'stremld0123456789 \t\n.,!?-_()\"") + ["  ", "é", "中", "٣", "½", "Ⅻ", "\u00a0", "😀",
                                                               "'", " '", "3.14", "ß", "\u0301"]
    texts = docs + ["".join(rng.choice(alphabet) for _ in range(rng.randint(1, 16))) for _ in range(5000)]
    byte_level = _pre_tokenizer()
    to_bytes = {b: c for b, c in enumerate(gpt2_byte_alphabet())}
    for text in texts:
        want = [p for p, _ in byte_level.pre_tokenize_str(text)]
        got = ["".join(to_bytes[b] for b in p.encode()) for p in split(split([text], regex.compile(r"\p{N}")), gpt2)]
        assert got == want, text


def gpt2_byte_alphabet() -> list[str]:
    """GPT-2's byte -> printable character table (its bytes_to_unicode), which llama.cpp's unicode.cpp also uses."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table, extra = {}, 0
    for b in range(256):
        if b in printable:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return [table[b] for b in range(256)]


llama_cpp = importlib.util.find_spec("llama_cpp")
needs_llama_cpp = pytest.mark.skipif(llama_cpp is None, reason="dev-only: pip install llama-cpp-python (builds "
                                                                "llama.cpp from source, minutes)")


@needs_llama_cpp
@pytest.mark.parametrize("overrides", [{}, {"q_lora_rank": None, "rope_scaling": yarn(factor=4.0, original=16,
                                                                                       mscale=0.8)}])
def test_llama_cpp_loads_the_file_and_agrees(tmp_path, tok, overrides):
    """llama.cpp itself: its logits on the exported file equal leanseek's, its greedy tokens too, and it tokenizes
    text (control-token spellings included, as text) and markup as leanseek does."""
    from llama_cpp import Llama

    fields = dict(vocab_size=tok.vocab_size, hidden_size=64, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16,
                  kv_lora_rank=32, q_lora_rank=32, n_group=4, topk_group=2)
    model = randomise(leanseek.Transformer(small_config(**{**fields, **overrides})))
    write_gguf(model, tok, tmp_path / "m.gguf", "f32")
    # float32 KV cache (llama.cpp keeps f16 by default): the comparison is then of the math alone
    llm = Llama(str(tmp_path / "m.gguf"), n_ctx=128, n_threads=2, logits_all=True, verbose=False, type_k=0, type_v=0)
    rng = random.Random(1)
    ids = [rng.randrange(tok.vocab_size) for _ in range(40)]
    llm.reset()
    llm.eval(ids)
    with torch.no_grad():
        want = model(torch.tensor([ids]))[0]
    assert (torch.from_numpy(llm.scores[:len(ids)].copy()) - want).abs().max() < 1e-4

    engine = leanseek.Engine(model, tok, max_batch=1, max_len=128)
    ours = engine.generate([ids[:8]], max_new_tokens=24)[0]
    llm.reset()
    theirs = []
    for token in llm.generate(ids[:8], temp=0.0):
        theirs.append(token)
        if len(theirs) == len(ours):
            break
    assert theirs == ours

    # GPT-2's own split would differ where spaces precede a digit ("=  46": "  4" vs leanseek's "  ", "4")
    text = "What does 'harbor' mean? <|end|> 12+34 =  46.\n    7 def f(x):\treturn x"
    assert llm.tokenize(text.encode(), add_bos=False, special=False) == tok.encode(text)
    markup = "<|user|>hi<|end|><|assistant|><think></think>12<|end|>"
    assert llm.tokenize(markup.encode(), add_bos=False, special=True) == tok.encode_markup(markup)


def test_export_command_writes_the_file(tmp_path, tok, capsys):
    from leanseek.cli import main

    model = randomise(leanseek.Transformer(small_config(vocab_size=tok.vocab_size)))
    leanseek.save_hf(model, tmp_path / "ckpt")
    for target, error in ((tmp_path / "m.gguf", "has no tokenizer.json"), (tmp_path, "is a folder")):
        with pytest.raises(SystemExit):
            main(["export", str(tmp_path / "ckpt"), "--gguf", str(target)])
        assert error in capsys.readouterr().err
        tok.save(tmp_path / "ckpt")
    main(["export", str(tmp_path / "ckpt"), "--gguf", str(tmp_path / "m.gguf"), "--outtype", "q8_0"])
    assert "Q8_0" in capsys.readouterr().out
    t, f, _ = read(tmp_path / "m.gguf")
    assert f["general.file_type"] == 7 and f["general.name"] == "ckpt"
    assert (t["token_embd.weight"] - model.embed_tokens.weight).abs().max() < 0.01
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt", "m.gguf"]  # no temporary file left
