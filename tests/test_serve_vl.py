"""A VL model behind the OpenAI-compatible app (pd mode, real HTTP, the official `openai` client): a chat message
with an image as a `data:` URL is prefilled on the prefill replica (vision tower, 3D positions), decoded on the
decode replica, and the greedy tokens equal transformers' `generate` on the same checkpoint and prompt; text-only
chat works on the same model; bad image input gets a 400 naming the part, and the server keeps serving."""

from __future__ import annotations

import base64
import io
import socket
from pathlib import Path
from typing import Any

import openai
import pytest
import torch

pytestmark = [pytest.mark.integration, pytest.mark.slow]

MODEL = "vlckpt"
GREEDY = dict(temperature=0, max_tokens=6, extra_body={"ignore_eos": True, "return_token_ids": True})


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def vl_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """conf/model/ernie45_tiny_vl.yaml with random weights and the built-in tokenizer (its image tokens 5/6/7)."""
    from ernie_platform.configs.schema import to_vl_config
    from ernie_platform.models import load_tokenizer, save_pretrained
    from ernie_platform.models.vl.grow import init_vl_weights
    from ernie_platform.models.vl.model import ErnieVLForConditionalGeneration
    from tests.conftest import compose_config

    cfg = compose_config("model=ernie45_tiny_vl")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = ErnieVLForConditionalGeneration(to_vl_config(cfg.model))
        init_vl_weights(model)
    return save_pretrained(model.eval(), tmp_path_factory.mktemp("tiny_vl") / MODEL, tokenizer=load_tokenizer(None))


@pytest.fixture(scope="module")
def url(ray_local, vl_ckpt: Path) -> Any:
    from ray import serve

    from workloads.serve.app import build_app

    port = _free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    app = build_app({"model.path": str(vl_ckpt), "serve.mode": "pd", "serve.disagg_min_prompt_tokens": 8,
                     "serve.engine.max_seq_len": 256, "serve.engine.max_batch_size": 8})  # fmt: skip
    serve.run(app, name="vl", route_prefix="/vl")
    yield f"http://127.0.0.1:{port}/vl"
    serve.shutdown()


def _client(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key="unused", timeout=120.0, max_retries=0)


def _scene_png() -> tuple[Any, str]:
    import random

    from ernie_platform.data.synthetic_vl import random_scene, render_scene

    image = render_scene(random_scene(random.Random(3), 3), 56)
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return image, "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _hf_greedy(vl_ckpt: Path, messages: list[dict], images: list[Any], n: int) -> list[int]:
    """The same prompt built in-process (chat template, image processor at the model's patch/merge sizes,
    placeholder expansion), generated greedily by transformers."""
    from transformers import AutoModelForImageTextToText

    from ernie_platform.models import load_tokenizer
    from ernie_platform.models.vl.image_processing import ErnieImageProcessor, ImageProcessorConfig
    from ernie_platform.serving.chat import encode_chat, normalize_chat, render_chat
    from ernie_platform.serving.images import mm_prompt

    tok = load_tokenizer(vl_ckpt)
    msgs, _ = normalize_chat(messages, is_vl=True)
    text = render_chat(tok, msgs, enable_thinking=False)
    kwargs: dict[str, Any] = {}
    if images:
        processor = ErnieImageProcessor(ImageProcessorConfig(patch_size=14, merge_size=2))
        ids, mm = mm_prompt(tok, processor, 2, text, images)
        kwargs = dict(
            pixel_values=mm.pixel_values,
            image_grid_thw=mm.image_grid_thw,
            mm_token_type_ids=torch.tensor([mm.mm_token_type_ids]),
            moe_mm_token_type_ids=torch.tensor([mm.moe_mm_token_type_ids]),
        )
    else:
        ids = encode_chat(tok, text)
    hf = AutoModelForImageTextToText.from_pretrained(str(vl_ckpt)).eval()
    with torch.no_grad():
        out = hf.generate(input_ids=torch.tensor([ids]), do_sample=False, max_new_tokens=n, min_new_tokens=n, **kwargs)
    return out[0, len(ids) :].tolist()


def test_image_chat_equals_transformers_and_bad_images_are_400(url: str, vl_ckpt: Path) -> None:
    image, data_url = _scene_png()
    messages = [{"role": "user", "content": [{"type": "text", "text": "How many shapes? "},
                                             {"type": "image_url", "image_url": {"url": data_url}}]}]  # fmt: skip
    client = _client(url)
    r = client.chat.completions.create(model=MODEL, messages=messages, **GREEDY)
    ref = _hf_greedy(vl_ckpt, messages, [image], GREEDY["max_tokens"])
    assert r.choices[0].token_ids == ref
    assert r.usage.prompt_tokens > 16  # the image's placeholder tokens count as prompt tokens
    streamed = client.chat.completions.create(model=MODEL, messages=messages, stream=True, **GREEDY)
    assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices) == r.choices[0].message.content

    for bad_url, code in (
        ("https://example.com/a.png", "invalid_image_url"),
        ("data:image/png;base64,AAAA", "invalid_image"),
    ):
        bad = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": bad_url}}]}]
        with pytest.raises(openai.BadRequestError) as e:
            client.chat.completions.create(model=MODEL, messages=bad, **GREEDY)
        assert e.value.body["code"] == code and e.value.body["param"] == "messages[0].content[0].image_url"

    text_only = [{"role": "user", "content": "Hello there, what do you see?"}]  # still serving, text on a VL model
    r = client.chat.completions.create(model=MODEL, messages=text_only, **GREEDY)
    assert r.choices[0].token_ids == _hf_greedy(vl_ckpt, text_only, [], GREEDY["max_tokens"])
