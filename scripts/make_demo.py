"""Build the embedded demo: a tiny Llama pretrained on generated text, and a task.

Pretraining text (generated here, seeded):
  - arithmetic facts, every count in 0..50: "12 + 7 = 19", "19 - 7 = 12"
  - look-up questions about static facts:
    "Tom has 12 apples. Anna has 3 pears. How many apples does Tom have? Answer: 12"
  - stories with actions, often followed by the new count:
    "Tom has 12 apples. Tom buys 7 more apples. Now Tom has 19 apples."

Fine-tuning task (never in the pretraining text): the same question asked after an action,
answered with the equation that solves it:
    prompt:     "Tom has 12 apples. Tom buys 7 more apples. How many apples does Tom have? Answer:"
    completion: " 12 + 7 = 19"
Zero-shot the base answers with a single (wrong) number. A short LoRA fine-tune teaches it to
write the equation, reusing what pretraining taught it (copying a count, doing the sum).

Run from the repository root (about 10 minutes on 2 idle CPU cores; on a busy machine
`--threads 1` is much faster and writes the same files):

    python scripts/make_demo.py

It writes qloraga/demo/model/ (bf16 safetensors + tokenizer) and
qloraga/demo/data/{train,eval}.jsonl. Everything is seeded: a rerun with the same library
versions reproduces the shipped files.
"""

import argparse
import json
import math
import random
import time
from collections import Counter
from pathlib import Path

import torch
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from tqdm import tqdm
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

# -----------------------------------------------------------------------------
# settings

SEED = 1234
MAX_N = 50  # every count, operand and result is in 0..MAX_N
N_TRAIN, N_EVAL = 2000, 200  # fine-tuning task sizes
PRETRAIN_DOCS = 500_000  # generated pretraining documents
BLOCK = 64  # pretraining sequence length (documents are packed)
BATCH = 64
STEPS = 1600
LR, MIN_LR, WARMUP = 3e-3, 3e-4, 100
N_THREADS = 2

NAMES = ["Tom", "Anna", "Ben", "Mia", "Sam", "Lea", "Max", "Eva"]
ITEMS = ["apples", "pears", "eggs", "pens", "books", "cards", "coins", "cups"]
GAIN = ["buys", "finds", "gets"]  # "Tom buys 7 more apples." -> add
LOSS = ["eats", "loses", "sells"]  # "Tom eats 7 of the apples." -> subtract
SPECIALS = ["<pad>", "<unk>", "<s>", "</s>", "<|system|>", "<|user|>", "<|assistant|>"]

CHAT_TEMPLATE = (  # "<s><|user|> ... <|assistant|> 19</s>"; {% generation %} marks the assistant tokens
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'assistant' %}"
    "{{ '<|assistant|> ' }}{% generation %}{{ message['content'] + eos_token }}{% endgeneration %}"
    "{% else %}{{ '<|' + message['role'] + '|> ' + message['content'] + ' ' }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
)

parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
parser.add_argument("--out", type=Path, default=Path("qloraga/demo"), help="writes OUT/model and OUT/data")
parser.add_argument("--steps", type=int, default=STEPS, help="pretraining steps (fewer for a quick try)")
parser.add_argument("--threads", type=int, default=N_THREADS, help="torch CPU threads (1 and 2 give the same files)")
args = parser.parse_args()

# -----------------------------------------------------------------------------
# data: pretraining text and the fine-tuning task


def equation(rng: random.Random) -> str:
    """An addition or subtraction fact, uniform over a + b = c with c <= MAX_N."""
    a, b = rng.randint(0, MAX_N), rng.randint(0, MAX_N)
    while a + b > MAX_N:
        a, b = rng.randint(0, MAX_N), rng.randint(0, MAX_N)
    return f"{a} + {b} = {a + b}" if rng.random() < 0.5 else f"{a + b} - {b} = {a}"


def facts(rng: random.Random, k: int) -> list[tuple[str, str, int]]:
    """k (name, item, count) facts with distinct names."""
    names = rng.sample(NAMES, k)
    return [(n, rng.choice(ITEMS), rng.randint(0, MAX_N)) for n in names]


def lookup_story(rng: random.Random) -> str:
    """Static facts followed by a question that only needs copying a number."""
    fs = facts(rng, rng.randint(1, 3))
    text = " ".join(f"{n} has {c} {i}." for n, i, c in fs)
    n, i, c = rng.choice(fs)
    if rng.random() < 0.8:
        return f"{text} How many {i} does {n} have? Answer: {c}"
    return f"{text} Who has {c} {i}? Answer: {n}"


def action(n: str, i: str, a: int, b: int, gain: bool, rng: random.Random) -> tuple[str, int]:
    """A sentence where n gains or loses b of their a items, and the new count."""
    if gain:
        return f"{n} {rng.choice(GAIN)} {b} more {i}.", a + b
    return f"{n} {rng.choice(LOSS)} {b} of the {i}.", a - b


def action_story(rng: random.Random) -> str:
    """Facts and actions; often the new count follows ("Now Tom has 19 apples."), never a question."""
    out = []
    for n, i, a in facts(rng, rng.randint(1, 2)):
        gain = a == 0 or (a < MAX_N and rng.random() < 0.5)
        sentence, c = action(n, i, a, rng.randint(1, MAX_N - a if gain else a), gain, rng)
        out += [f"{n} has {a} {i}.", sentence]
        if rng.random() < 0.7:
            out.append(f"Now {n} has {c} {i}.")
    return " ".join(out)


def pretrain_doc(rng: random.Random) -> str:
    """One pretraining document: an equation, a look-up story or an action story."""
    r = rng.random()
    if r < 0.55:
        return equation(rng)
    return lookup_story(rng) if r < 0.7 else action_story(rng)


def word_problem(a: int, b: int, op: str, rng: random.Random) -> dict[str, str]:
    """One task example: a story with one action, the look-up question, and the worked answer."""
    n, i = rng.choice(NAMES), rng.choice(ITEMS)
    sentence, answer = action(n, i, a, b, op == "+", rng)
    prompt = f"{n} has {a} {i}. {sentence} How many {i} does {n} have? Answer:"
    return {"prompt": prompt, "completion": f" {a} {op} {b} = {answer}"}


def task(rng: random.Random) -> tuple[list[dict[str, str]], list[dict[str, str]]]:
    """Train and eval word problems; eval (a, b, op) triples never occur in train."""
    adds = [(a, b, "+") for a in range(1, MAX_N) for b in range(1, MAX_N - a + 1)]
    subs = [(a, b, "-") for a in range(2, MAX_N + 1) for b in range(1, a)]
    triples = rng.sample(adds, (N_TRAIN + N_EVAL) // 2) + rng.sample(subs, (N_TRAIN + N_EVAL) // 2)
    rng.shuffle(triples)
    rows = [word_problem(a, b, op, rng) for a, b, op in triples]
    return rows[:N_TRAIN], rows[N_TRAIN:]


rng = random.Random(SEED)
train_rows, eval_rows = task(rng)
docs = [pretrain_doc(rng) for _ in tqdm(range(PRETRAIN_DOCS), desc="generate")]
val_docs = [pretrain_doc(rng) for _ in range(2000)]

data_dir = args.out / "data"
data_dir.mkdir(parents=True, exist_ok=True)
for name, rows in [("train", train_rows), ("eval", eval_rows)]:
    with open(data_dir / f"{name}.jsonl", "w") as f:
        f.writelines(json.dumps(row) + "\n" for row in rows)
print(f"task: {len(train_rows)} train, {len(eval_rows)} eval; e.g. {train_rows[0]}")

# -----------------------------------------------------------------------------
# tokenizer: word level, one token per word, number (0..50) and punctuation mark

pre_tokenizer = pre_tokenizers.Whitespace()  # splits "Answer:" into "Answer", ":"


def words(text: str) -> list[str]:
    """Split text the way the tokenizer does."""
    return [w for w, _ in pre_tokenizer.pre_tokenize_str(text)]


counts = Counter(w for doc in docs for w in words(doc))
task_words = {w for row in train_rows + eval_rows for w in words(row["prompt"] + row["completion"])}
assert task_words <= counts.keys(), f"task words never pretrained: {task_words - counts.keys()}"
vocab = {w: i for i, w in enumerate(SPECIALS + sorted(counts))}

tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
tok.pre_tokenizer = pre_tokenizer
tok.post_processor = processors.TemplateProcessing(  # prepend BOS, like Llama
    single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", vocab["<s>"])]
)
tok.add_special_tokens(SPECIALS)
tokenizer = PreTrainedTokenizerFast(
    tokenizer_object=tok,
    bos_token="<s>",
    eos_token="</s>",
    pad_token="<pad>",
    unk_token="<unk>",
    additional_special_tokens=SPECIALS[4:],
    chat_template=CHAT_TEMPLATE,
    model_max_length=BLOCK,
)
print(f"tokenizer: {len(tokenizer)} tokens")


def pack(texts: list[str]) -> torch.Tensor:
    """Tokenize into one stream, <s> doc </s> <s> doc </s> ..., cut into rows of BLOCK tokens."""
    ids = [[*t, tokenizer.eos_token_id] for t in tokenizer(texts)["input_ids"]]
    flat = torch.tensor([i for t in ids for i in t])
    return flat[: len(flat) // BLOCK * BLOCK].view(-1, BLOCK)


blocks, val_blocks = pack(docs), pack(val_docs)
print(f"pretraining: {blocks.numel():,} tokens in {len(blocks):,} blocks of {BLOCK}")

# -----------------------------------------------------------------------------
# model and pretraining

torch.manual_seed(SEED)
torch.set_num_threads(args.threads)
torch.set_flush_denormal(True)  # subnormal floats are slow on CPU
config = LlamaConfig(
    vocab_size=math.ceil(len(tokenizer) / 64) * 64,
    hidden_size=128,
    intermediate_size=384,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=BLOCK,
    bos_token_id=tokenizer.bos_token_id,
    eos_token_id=tokenizer.eos_token_id,
    pad_token_id=tokenizer.pad_token_id,
    tie_word_embeddings=False,
)
model = LlamaForCausalLM(config)
print(f"model: {sum(p.numel() for p in model.parameters()):,} parameters")

decay = [p for p in model.parameters() if p.dim() >= 2]
no_decay = [p for p in model.parameters() if p.dim() < 2]
optimizer = torch.optim.AdamW(
    [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
    lr=LR,
    betas=(0.9, 0.95),
)


def lr_at(step: int) -> float:
    """Linear warmup, then cosine decay to MIN_LR."""
    if step < WARMUP:
        return LR * (step + 1) / WARMUP
    t = (step - WARMUP) / max(1, args.steps - WARMUP)
    return MIN_LR + 0.5 * (LR - MIN_LR) * (1 + math.cos(math.pi * t))


@torch.no_grad()
def val_loss() -> float:
    """Mean next-token loss on held-out pretraining text."""
    model.eval()
    losses = [model(input_ids=b, labels=b).loss.item() for b in val_blocks.split(256)]
    model.train()
    return sum(losses) / len(losses)


assert len(blocks) >= args.steps * BATCH, "not enough pretraining text for this many steps"
order = torch.randperm(len(blocks), generator=torch.Generator().manual_seed(SEED))
model.train()
t0 = time.time()
pbar = tqdm(range(args.steps), desc="pretrain")
for step in pbar:
    batch = blocks[order[step * BATCH : (step + 1) * BATCH]]  # one pass, no block repeats
    for group in optimizer.param_groups:
        group["lr"] = lr_at(step)
    loss = model(input_ids=batch, labels=batch).loss
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    pbar.set_postfix(loss=f"{loss.item():.3f}")
    if step % 250 == 0:
        tqdm.write(f"step {step}: train loss {loss.item():.4f}, val loss {val_loss():.4f}")
print(f"pretraining done in {time.time() - t0:.0f}s: final train loss {loss.item():.4f}, val loss {val_loss():.4f}")

# -----------------------------------------------------------------------------
# save: bf16 safetensors + tokenizer

model_dir = args.out / "model"
model.to(torch.bfloat16).save_pretrained(model_dir)
tokenizer.save_pretrained(model_dir)
print(f"saved to {model_dir}")
