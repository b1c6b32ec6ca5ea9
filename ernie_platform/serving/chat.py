"""Chat prompts and reasoning output.

Prompt: the checkpoint tokenizer's chat template when it has one (`tokenizer.apply_chat_template`), else ERNIE 4.5's
conversation format (`ernie_platform.models.tokenizer.CHAT_TEMPLATE`: `<|begin_of_sentence|>`, the system text, then
`User: ...\\n` / `Assistant: ...<|end_of_sentence|>` turns and a final `Assistant: `). Thinking mode: the request's
`enable_thinking` is passed to the template; a template that does not know the flag gets ERNIE's thinking opening
`<think>\\n` appended after `Assistant: ` when thinking is on, so the model starts inside its reasoning.

Images (VL models): `image_url` parts with `data:` URLs become `Picture k:` + the image marker in the message text
(`serving.images`); the rendered prompt then goes through the image processor and `build_mm_inputs`.

Output: with thinking on, the text before `</think>` is `reasoning_content` and the rest `content`.
`ReasoningSplitter` works incrementally on the engine's (token id, text) events: `</think>` is a special token in
ERNIE vocabularies (the detokenizer drops it from the text, so it is found by id), or plain text in other
tokenizers (found in the text, with a partial tag held back across events). Newlines around the tag are dropped.
Streamed deltas concatenate to exactly the non-streamed fields because both go through the same splitter.
"""

from __future__ import annotations

from typing import Any, Optional

from ernie_platform.models.tokenizer import CHAT_TEMPLATE as ERNIE_CHAT_TEMPLATE
from ernie_platform.serving.images import IMAGE_PART_TYPES, MAX_IMAGES, check_text, image_from_part, image_marker
from ernie_platform.serving.protocol import bad_request

THINK_START, THINK_END = "<think>", "</think>"
ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}


def _text_of(content: Any, i: int, is_vl: bool, images: list[Any]) -> str:
    """A message's text: a string, or the text parts of a content list. Image parts need a VL model: each is decoded
    into `images` and stands in the text as `Picture k:` + the image marker (`serving.images`)."""
    if isinstance(content, str):
        if is_vl:
            check_text(content, f"messages[{i}].content")
        return content
    if not isinstance(content, list):
        raise bad_request(
            f"messages[{i}].content must be a string or a list of content parts", f"messages[{i}].content"
        )
    out = []
    for j, part in enumerate(content):
        where = f"messages[{i}].content[{j}]"
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text" and isinstance(part.get("text"), str):
            if is_vl:
                check_text(part["text"], where)
            out.append(part["text"])
        elif kind in IMAGE_PART_TYPES:
            if not is_vl:
                raise bad_request(
                    f"{where}: image input needs a vision-language model; the served model is text-only",
                    where,
                    "unsupported_content",
                )
            if len(images) >= MAX_IMAGES:
                raise bad_request(f"{where}: at most {MAX_IMAGES} images per request", where, "invalid_value")
            images.append(image_from_part(part, where))
            out.append(image_marker(len(images)))
        else:
            expected = "'text' or 'image_url'" if is_vl else "'text'"
            raise bad_request(f"{where}: unsupported content part (expected type {expected})", where, "invalid_value")
    return "".join(out)


def normalize_chat(messages: list[dict[str, Any]], is_vl: bool = False) -> tuple[list[dict[str, str]], list[Any]]:
    """Validated `[{"role", "content"}]` with roles system/user/assistant (developer -> system), and the images of
    the conversation in order (PIL, RGB; a VL model only)."""
    if not messages:
        raise bad_request("messages must be a non-empty list", "messages", "invalid_value")
    out: list[dict[str, str]] = []
    images: list[Any] = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise bad_request(f"messages[{i}] must be an object", f"messages[{i}]")
        role = m.get("role")
        if not isinstance(role, str) or role not in ROLES:  # (a list or dict is not hashable: no dict lookup)
            raise bad_request(
                f"messages[{i}].role={role!r} is not supported (system, developer, user, assistant)",
                f"messages[{i}].role",
                "invalid_value",
            )
        content = m.get("content")
        if content is None and role == "assistant":
            content = ""
        if content is None:
            raise bad_request(f"messages[{i}].content is required", f"messages[{i}].content", "invalid_value")
        out.append({"role": ROLES[role], "content": _text_of(content, i, is_vl, images)})
    return out, images


def normalize_messages(messages: list[dict[str, Any]], is_vl: bool = False) -> list[dict[str, str]]:
    """`normalize_chat` without the images."""
    return normalize_chat(messages, is_vl)[0]


def template_knows_thinking(tokenizer: Any) -> bool:
    tpl = getattr(tokenizer, "chat_template", None)
    if isinstance(tpl, dict):
        tpl = tpl.get("default") or next(iter(tpl.values()), None)
    return isinstance(tpl, str) and "enable_thinking" in tpl


def render_chat(tokenizer: Any, messages: list[dict[str, str]], enable_thinking: bool) -> str:
    """The prompt text of a conversation, ending with the assistant's generation prompt."""
    has_template = bool(getattr(tokenizer, "chat_template", None))
    kwargs: dict[str, Any] = {"tokenize": False, "add_generation_prompt": True, "enable_thinking": enable_thinking}
    if not has_template:
        kwargs["chat_template"] = ERNIE_CHAT_TEMPLATE
    text = tokenizer.apply_chat_template(messages, **kwargs)
    if enable_thinking and not (has_template and template_knows_thinking(tokenizer)):
        text += THINK_START + "\n"
    return text


def encode_chat(tokenizer: Any, text: str) -> list[int]:
    # The rendered template already holds the begin-of-sentence marker: no second BOS from add_special_tokens.
    return list(tokenizer.encode(text, add_special_tokens=False))


def think_end_id(tokenizer: Any) -> Optional[int]:
    """Id of a single `</think>` token in the vocabulary, else None (then it is matched as text)."""
    vocab = tokenizer.get_vocab() if hasattr(tokenizer, "get_vocab") else {}
    tid = vocab.get(THINK_END)
    return int(tid) if tid is not None else None


class ReasoningSplitter:
    """Incremental split of generated text into (reasoning, content) at `</think>`.

    Feed every event's `(token_id, text)`; each call returns the (reasoning_delta, content_delta) now safe to send.
    Held back across calls: a trailing partial `</think>` and trailing newlines of the reasoning (dropped if the tag
    follows). Leading newlines of both parts and a leading `<think>` in the output are dropped too.
    """

    def __init__(self, end_id: Optional[int]):
        self.end_id = end_id
        self.in_reasoning = True
        self.pending = ""  # reasoning text not yet released
        self.content_started = False
        self.started = False

    def feed(self, token_id: Optional[int], text: str) -> tuple[str, str]:
        if not self.in_reasoning:
            return "", self._content(text)
        buf = self.pending + text
        is_end = self.end_id is not None and token_id == self.end_id
        if not self.started:
            buf = buf.lstrip("\n")
            if buf and buf != THINK_START and THINK_START.startswith(buf) and not is_end:
                self.pending = buf  # could still become a leading "<think>"
                return "", ""
            if buf.startswith(THINK_START):
                buf = buf[len(THINK_START) :].lstrip("\n")
            self.started = bool(buf) or is_end
        cut = buf.find(THINK_END)
        if cut >= 0 or is_end:
            if cut >= 0:
                reasoning, rest = buf[:cut], buf[cut + len(THINK_END) :]
            else:
                reasoning, rest = buf, ""
            self.in_reasoning, self.pending = False, ""
            return reasoning.rstrip("\n"), self._content(rest)
        hold = _partial_suffix(buf, THINK_END)
        body = buf[: len(buf) - hold]
        keep = len(body) - len(body.rstrip("\n"))  # trailing newlines wait: they are dropped if the tag follows
        self.pending = buf[len(body) - keep :]
        return body[: len(body) - keep], ""

    def finish(self) -> tuple[str, str]:
        """End of output: release what was held back (no `</think>` came)."""
        out, self.pending = self.pending, ""
        return (out, "") if self.in_reasoning else ("", "")

    def _content(self, text: str) -> str:
        if not self.content_started:
            text = text.lstrip("\n")
            self.content_started = bool(text)
        return text


def _partial_suffix(text: str, tag: str) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of `tag`."""
    for k in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:k]):
            return k
    return 0
