"""
The terminal chat of `cognica-poe chat`, shared by both backends (torch, MLX): the conversation is rendered with the
model's chat tokens (what the user types stays text), and each reply streams from the backend's decoder.
"""

import sys
from collections.abc import Callable

# generate(prompt ids, streamer(row, token), stop token ids): decode one reply, calling streamer per token
Generate = Callable[[list[int], Callable[[int, int], None], list[int]], object]


def chat_loop(tok, generate: Generate, banner: str, system: str | None = None) -> None:
    """Read user lines until an empty line or end of input; print each reply as its tokens arrive."""
    end = tok.convert_tokens_to_ids("<|assistant_end|>")
    messages = [{"role": "system", "content": system}] if system else []
    print(f"{banner}; empty line or Ctrl-D to quit", file=sys.stderr)
    while True:
        try:
            line = input("you> ").strip()
        except EOFError:
            break
        if not line:
            break
        messages.append({"role": "user", "content": line})
        ids = tok.apply_chat_template(messages, tokenize=True, add_generation_prompt=True, return_dict=False,
                                      sanitize_control_tokens=True)  # what the user types is text
        reply = []

        def stream(row: int, token: int, reply: list[int] = reply) -> None:
            if token != end:
                reply.append(token)
                print(tok.decode([token]), end="", flush=True)

        print("assistant> ", end="", flush=True)
        generate(ids, stream, [end, tok.bos_token_id])
        print()
        messages.append({"role": "assistant", "content": tok.decode(reply)})
