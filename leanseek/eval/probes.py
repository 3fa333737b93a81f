"""What the speedrun's report measures on the finished models besides task accuracy: sample conversations, how
well definitions from the corpus are recalled, definitions of held-out words without and with the built-in
`define` tool, the MTP module's draft acceptance, the experts' load per layer, and the KV cache against standard
attention."""

from __future__ import annotations

import random
import re
from collections import Counter
from pathlib import Path

import torch

from ..data import load_split
from ..data.chat import encode_chat, read_chats
from ..data.chat import LEANSEEK_CHAT
from ..data.instructions import DEFINITION_QUESTION, definitions, split_words
from ..data.tokenizer import END_OF_TURN, TOOL_CALL, TextTokenizer
from ..device import inference_dtype, pick_device
from ..infer.engine import Engine
from ..model.hf import load_hf
from ..serve.text import TextStream
from ..serve.toolcalls import tool_parser
from ..tasks import parse_mix
from ..train.balance import expert_load, max_violation
from ..train.checkpoint import checkpoint_of
from ..train.cost import forward_flops
from ..tools import MAX_TOOL_ROUNDS, define, tool_definitions
from ..train.loader import eval_windows
from .tasks import rollout_context, rollouts


def reply(engine: Engine, tokenizer: TextTokenizer, prompts: list[str], max_new_tokens: int,
          speculative: bool = False, history: list[dict] = ()) -> list[dict]:
    """Greedy replies to `prompts`, each the next user turn after `history`: {"user", "reasoning", "content"}
    each, split as `leanseek serve` splits them."""
    ids = [encode_chat(tokenizer, [*history, {"role": "user", "content": p}], add_generation_prompt=True)[0]
           for p in prompts]
    outs = engine.generate(ids, max_new_tokens=max_new_tokens, stop=[tokenizer.token_id(END_OF_TURN)],
                           speculative=speculative)
    replies = []
    for prompt, out in zip(prompts, outs):
        reasoning, content = TextStream(tokenizer, [], chat=True).feed(out, final=True)
        replies.append({"user": prompt, "reasoning": reasoning, "content": content.strip()})
    return replies


def converse(engine: Engine, tokenizer: TextTokenizer, questions: list[str], max_new_tokens: int) -> list[dict]:
    """One conversation, turn by turn, its history holding the answers without their reasoning (as the web chat
    and DeepSeek's API send it back)."""
    history, turns = [], []
    for question in questions:
        turn = reply(engine, tokenizer, [question], max_new_tokens, history=history)[0]
        history += [{"role": "user", "content": question}, {"role": "assistant", "content": turn["content"]}]
        turns.append(turn)
    return turns


def tool_replies(engine: Engine, tokenizer: TextTokenizer, prompts: list[str], max_new_tokens: int,
                 max_rounds: int = MAX_TOOL_ROUNDS) -> list[dict]:
    """Greedy replies with the built-in tools offered, their calls run as `leanseek eval` and GRPO run them
    (eval.tasks.rollouts: up to max_rounds rounds, max_new_tokens of the model's own over all of them). Each
    {"user", "content" (the last round's), "calls" ([{"name", "arguments", "result"}] run), "attempts" (calls
    written, well-formed or not, run or not)}."""
    ids = [encode_chat(tokenizer, [{"role": "user", "content": p}], add_generation_prompt=True,
                       tools=tool_definitions())[0] for p in prompts]
    need = rollout_context(max(map(len, ids), default=0), max_new_tokens, tools=True)
    if need > engine.max_len:
        raise ValueError(f"replies with tools need a context of {need} tokens; the engine's max_len is "
                         f"{engine.max_len}")
    results = []
    for prompt, out in zip(prompts, rollouts(engine, tokenizer, ids, max_new_tokens, offers=True,
                                             max_rounds=max_rounds)):
        parser = tool_parser(LEANSEEK_CHAT)()
        content = parser.feed(TextStream(tokenizer, [], chat=True).feed(out.final, final=True)[1])[0]
        results.append({"user": prompt, "content": (content + parser.finish()[0]).strip(), "calls": out.calls,
                        "attempts": out.written})
    return results


def gloss_f1(reply: str, reference: str) -> float:
    """Word-overlap F1 between two definitions, each taken after its 'word (pos):' head."""
    a, b = (Counter(re.findall(r"[a-z]+", t.split(":", 1)[-1].lower())) for t in (reply, reference))
    common = sum((a & b).values())
    if not common:
        return 0.0
    precision, recall = common / sum(a.values()), common / sum(b.values())
    return 2 * precision * recall / (precision + recall)


def definition_recall(engine, tokenizer, sft_chats: list[list[dict]], n: int, max_new_tokens: int) -> dict | None:
    """Ask "What does 'w' mean?" for n words taught in SFT and n words WordNet defines that SFT never asked about
    (the model read WordNet in pretraining); score each reply by word-overlap F1 with WordNet's gloss. "chance" is
    the F1 of each reply against another word's gloss."""
    taught = taught_definitions(sft_chats)
    untaught = {}
    for chat in definitions(random.Random(1), 20 * n + 2000):
        word = DEFINITION_QUESTION.match(chat[0]["content"]).group(1)
        if word not in taught:
            untaught.setdefault(word, chat[1]["content"])
    if not taught or not untaught:
        return None  # WordNet is not installed: no definitions in the corpus or the SFT set
    out = {}
    for name, pool in (("taught in SFT", taught), ("only in the pretraining corpus", untaught)):
        words = list(pool)[:n]
        answers = reply(engine, tokenizer, [f"What does '{w}' mean?" for w in words], max_new_tokens)
        scores = [gloss_f1(a["content"], pool[w]) for a, w in zip(answers, words)]
        chance = [gloss_f1(a["content"], pool[words[(i + 1) % len(words)]]) for i, a in enumerate(answers)]
        out[name] = {"n": len(words), "f1": sum(scores) / len(scores), "chance_f1": sum(chance) / len(chance),
                     "f1>=0.5": sum(s >= 0.5 for s in scores) / len(scores),
                     "examples": [{"word": words[i], "reply": answers[i]["content"], "wordnet": pool[words[i]],
                                   "f1": scores[i]} for i in quantile_picks(scores)]}
    return out


def taught_definitions(sft_chats: list) -> dict[str, str]:
    """word -> answer for the definition questions SFT answered at once (not through a tool call)."""
    taught = {}
    for chat in sft_chats:
        messages = chat["messages"] if isinstance(chat, dict) else chat
        m = DEFINITION_QUESTION.match(messages[0]["content"]) if messages[0]["role"] == "user" else None
        if m and len(messages) == 2 and not messages[1].get("tool_calls"):
            taught[m.group(1)] = messages[1]["content"]
    return taught


def tool_use(engine, tokenizer, sft_chats: list, n: int, max_new_tokens: int) -> dict | None:
    """Definitions of n held-out words (in no SFT conversation: instructions.word_group), asked without the
    tools and with them (the calls run, as `leanseek chat` runs them), scored by word-overlap F1 with the first
    line `define` gives; "chance" scores each reply against another word's. Also: how many replies called a
    tool, the share of the calls written that were well-formed (parsed, a known tool, arguments it accepts),
    and the share of n words taught in SFT that the model looked up needlessly."""
    taught = taught_definitions(sft_chats)
    mentioned = set()  # words quoted in SFT's questions: a run made before the split may have taught any word
    for chat in sft_chats:
        for m in chat["messages"] if isinstance(chat, dict) else chat:
            if m["role"] == "user":
                mentioned.update(re.findall(r"'([^']+)'", m["content"]))
    held_out = [w for w in split_words()["held_out"] if w not in mentioned]
    if len(held_out) < 2 or tokenizer.token_id(TOOL_CALL) is None:
        return None  # no WordNet, or a tokenizer made before tool support
    words = random.Random(0).sample(held_out, min(n, len(held_out)))
    reference = {w: define(w).split("\n")[0] for w in words}
    questions = [f"What does '{w}' mean?" for w in words]

    def scores(replies):
        f1 = [gloss_f1(r["content"], reference[w]) for r, w in zip(replies, words)]
        chance = [gloss_f1(r["content"], reference[words[(i + 1) % len(words)]]) for i, r in enumerate(replies)]
        return {"n": len(words), "f1": sum(f1) / len(f1), "chance_f1": sum(chance) / len(chance),
                "examples": [{"word": words[i], "reply": replies[i]["content"], "wordnet": reference[words[i]],
                              "f1": f1[i], **({"calls": replies[i]["calls"]} if "calls" in replies[i] else {})}
                             for i in quantile_picks(f1)]}

    without = scores(reply(engine, tokenizer, questions, max_new_tokens))
    answers = tool_replies(engine, tokenizer, questions, max_new_tokens)
    calls = [c for a in answers for c in a["calls"]]
    attempts = sum(a["attempts"] for a in answers)
    well_formed = sum(not c["result"].startswith("error:") for c in calls)
    known = list(taught)[:n]
    needless = tool_replies(engine, tokenizer, [f"What does '{w}' mean?" for w in known], max_new_tokens,
                            max_rounds=0) if known else []
    return {"without tool": without,
            "with tool": {**scores(answers), "replies with a call": sum(bool(a["calls"]) for a in answers) / len(words),
                          "calls written": attempts, "well-formed calls": well_formed / attempts if attempts else None},
            "taught words looked up": sum(a["attempts"] > 0 for a in needless) / len(needless) if needless else None}


def quantile_picks(scores: list[float]) -> list[int]:
    """Indices of the best, upper-quartile, median, lower-quartile and worst scores: examples that show the
    spread rather than whichever came first."""
    order = sorted(range(len(scores)), key=lambda i: -scores[i])
    return list(dict.fromkeys(order[round(q * (len(order) - 1))] for q in (0, 0.25, 0.5, 0.75, 1)))


@torch.no_grad()
def balance(model, tokens, seq_len: int, n_tokens: int) -> dict:
    """The share of routed-expert slots each expert got, per MoE layer, on validation windows; and MaxVio."""
    x, _ = eval_windows(tokens, seq_len, n_tokens)
    load = 0
    for start in range(0, len(x), 8):
        _, routing, _ = model.hidden(x[start:start + 8].to(model.lm_head.weight.device))
        load = load + expert_load(routing, model.cfg.n_routed_experts)
    share = load / load.sum(-1, keepdim=True)
    first = model.cfg.first_k_dense_replace
    return {"layers": list(range(first, first + len(share))), "share": share.tolist(),
            "maxvio": max_violation(load).tolist(), "tokens": int(x.numel())}


def run_probes(out: Path, preset: dict, device: str = "auto") -> dict:
    """The probes of the SFT model and the final (GRPO) one, with greedy decoding throughout, on `device` (a
    --device value) in the engine's dtype there."""
    p = preset["probes"]
    device = pick_device(device)
    dtype = inference_dtype(device)
    task = parse_mix(preset["rl"]["task"])[0][0]  # a mix's first task
    sft_chats = read_chats(out / "sft.jsonl")
    # MTP acceptance over task problems and SFT questions. The MTP module learns in SFT or, where SFT leaves its loss
    # out, in a stage of its own after SFT; GRPO trains the main model only, so its drafts may fit the final model
    # less well.
    spec_prompts = [q.prompt for q in task.test_set(p["mtp_prompts"] // 2)]
    spec_prompts += [(c["messages"] if isinstance(c, dict) else c)[0]["content"]
                     for c in sft_chats[:p["mtp_prompts"] - len(spec_prompts)]]
    recall, tools, acceptance, engines = {}, {}, {}, []
    from ..speedrun import sft_model

    for name in ("sft", "rl"):
        path = checkpoint_of(out / (sft_model(preset) if name == "sft" else name))
        tokenizer, model = TextTokenizer.load(path), load_hf(path, dtype=dtype, device=device)
        engine = Engine(model, tokenizer, max_batch=64, max_len=1024)  # room for tool rounds (tool_replies)
        recall[name] = definition_recall(engine, tokenizer, sft_chats, p["definitions"], p["max_new_tokens"])
        tools[name] = tool_use(engine, tokenizer, sft_chats, p.get("tool_words", p["definitions"]),
                               p["max_new_tokens"])
        reply(engine, tokenizer, spec_prompts, p["max_new_tokens"], speculative=True)
        acceptance[name] = {"rate": engine.acceptance_rate, "drafted": engine.stats["drafted"]}
        engines.append(engine)

    prompts = ["Hello! Who are you?", "What can you do?"]
    if preset["chats"]["python"]:
        prompts.append("What does json.dumps do?")
    if recall["rl"]:
        examples = [part["examples"] for part in recall["rl"].values()]  # the median reply of each group
        prompts += [f"What does '{e[len(e) // 2]['word']}' mean?" for e in examples]
    prompts += [problem.prompt for problem in task.test_set(3)]
    samples = reply(engine, tokenizer, prompts, p["max_new_tokens"])  # the final model's
    definition = [q for q in prompts if q.startswith("What does '")][:1]
    conversation = converse(engine, tokenizer, [prompts[0], *definition, prompts[-1], prompts[1]],
                            p["max_new_tokens"])

    val, _ = load_split(out / "data", "val")
    seq_len = preset["pretrain"]["seq_len"]
    experts = {"pretrain": balance(load_hf(checkpoint_of(out / "pretrain"), dtype=dtype, device=device), val,
                                   seq_len, p["balance_tokens"]),
               "rl": balance(model, val, seq_len, p["balance_tokens"])}
    tokens = sum(e.processed_tokens for e in engines) + sum(e["tokens"] for e in experts.values())
    kv = Engine(model, tokenizer, max_batch=16, max_len=1024).memory_report()  # `leanseek serve`'s defaults
    kv.update(max_batch=16, max_len=1024, dtype=str(model.lm_head.weight.dtype).removeprefix("torch."))
    return {"samples": samples, "conversation": conversation, "definitions": recall if recall["rl"] else None,
            "tools": tools if tools["rl"] else None,
            "mtp_acceptance": acceptance, "experts": experts, "kv_cache": kv, "tokens": tokens,
            "flops": forward_flops(model.cfg, seq_len, tokens)}
