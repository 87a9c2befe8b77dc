"""Chat with a fine-tuned run: `qloraga chat --run OUT` (or `python scripts/chat.py --run OUT`).

Loads the base as the run did (4-bit or not, its dtype) with the run's adapter (or `--checkpoint N`, with
the LoRA-GA correction folded in), renders each message as the run's training rendered its prompts (the chat
template for chat data; for prompt-completion, alpaca and text data that format's prompt, the message alone,
inside the frame the training prompts share if they share one: `--no-frame` turns that off), streams the answer
token by token and keeps the conversation. `--prompt` answers once and exits; `--base-only`
talks to the untuned base. Type /reset to start a new conversation, /exit (or Ctrl-D) to leave.
"""

from __future__ import annotations

import argparse
import sys

from qloraga.prompt_frame import Frame, rendering


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="qloraga chat", description=__doc__.splitlines()[0])
    p.add_argument("--run", required=True, help="output folder of a fine-tuning run (holds config.yaml)")
    p.add_argument("--checkpoint", type=int, help="use checkpoints/checkpoint-N instead of the final adapter/")
    p.add_argument("--base-only", action="store_true", help="the untuned base, to compare with")
    p.add_argument("--prompt", help="answer this one message and exit (no interactive session)")
    p.add_argument("--system", help="system message at the start of the conversation")
    p.add_argument("--max-new-tokens", type=int, default=256, help="longest answer, in tokens")
    p.add_argument("--temperature", type=float, default=0.7, help="sampling temperature (0: greedy)")
    p.add_argument("--top-p", type=float, default=0.9, help="nucleus sampling threshold")
    p.add_argument("--seed", type=int, help="random seed of the sampling")
    p.add_argument("--dtype", choices=["bfloat16", "float32"], help="compute dtype (default: the run's)")
    p.add_argument("--no-frame", action="store_true",
                   help="send the message as written, not inside the frame the training prompts share")
    return p


class Chat:
    """A conversation with a model: the messages so far, one streamed answer per `reply`, each prompt rendered
    as data of format `fmt` was in training (`formats.generation_prompt`)."""

    def __init__(self, model, tokenizer, args: argparse.Namespace, stream=None, fmt: str = "messages",
                 frame: Frame | None = None):
        self.model, self.tokenizer, self.args, self.fmt, self.frame = model, tokenizer, args, fmt, frame
        self.stream = stream if stream is not None else sys.stdout
        self.messages: list[dict[str, str]] = []
        self.reset()

    def reset(self) -> None:
        self.messages = [{"role": "system", "content": self.args.system}] if self.args.system else []

    def generation_kwargs(self) -> dict:
        if self.args.temperature <= 0:
            return {"do_sample": False}
        return {"do_sample": True, "temperature": self.args.temperature, "top_p": self.args.top_p}

    def reply(self, text: str) -> str:
        import torch
        from transformers import TextStreamer

        from qloraga.formats import encode_prompt, generation_prompt

        self.messages.append({"role": "user", "content": self.frame.wrap(text) if self.frame else text})
        ids = torch.tensor([encode_prompt(self.tokenizer, generation_prompt(self.messages, self.fmt, self.tokenizer),
                                          self.fmt)])
        device = next(self.model.parameters()).device
        inputs = {"input_ids": ids.to(device), "attention_mask": torch.ones_like(ids).to(device)}
        streamer = TextStreamer(self.tokenizer, skip_prompt=True, skip_special_tokens=True)
        streamer.on_finalized_text = lambda chunk, stream_end=False: print(
            chunk, end="" if not stream_end else "\n", flush=True, file=self.stream)
        with torch.inference_mode():
            output = self.model.generate(**inputs, max_new_tokens=self.args.max_new_tokens, streamer=streamer,
                                         pad_token_id=self.tokenizer.pad_token_id, **self.generation_kwargs())
        answer = self.tokenizer.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True).strip()
        self.messages.append({"role": "assistant", "content": answer})
        return answer


def interactive(chat: Chat) -> None:
    print("[qloraga] chat: /reset starts over, /exit or Ctrl-D leaves", file=sys.stderr)
    while True:
        try:
            text = input("\n>>> ").strip()
        except (EOFError, KeyboardInterrupt):
            print()
            return
        if text in ("/exit", "/quit"):
            return
        if text == "/reset":
            chat.reset()
            print("[qloraga] new conversation", file=sys.stderr)
            continue
        if text:
            chat.reply(text)


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    from transformers import set_seed

    from qloraga.cli import run_command
    from qloraga.errors import ConfigError
    from qloraga.formats import CHAT_FORMATS
    from qloraga.runs import load_run_model, open_run

    def job() -> None:
        run = open_run(args.run)
        fmt = run.dataset_format()
        if args.system and fmt not in CHAT_FORMATS:
            raise ConfigError(f"--system: this run trained on {fmt} data, whose prompts have no system message "
                             "(only runs on messages or sharegpt data do). Drop --system.")
        model, tokenizer = load_run_model(run, checkpoint=args.checkpoint, base_only=args.base_only,
                                          dtype=args.dtype)
        if args.seed is not None:
            set_seed(args.seed)
        frame = None if args.no_frame else run.prompt_frame()
        what = "the base alone" if args.base_only else (
            f"checkpoint {args.checkpoint}" if args.checkpoint is not None else "the fine-tuned adapter")
        print(f"[qloraga] {run.config.model} with {what}; prompts rendered as in training: "
              f"{rendering(fmt, frame)}", file=sys.stderr)
        chat = Chat(model, tokenizer, args, fmt=fmt, frame=frame)
        if args.prompt is not None:
            chat.reply(args.prompt)
        else:
            interactive(chat)

    return run_command(job, interrupted="stopped")


if __name__ == "__main__":
    sys.exit(main())
