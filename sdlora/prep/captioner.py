"""The vision-language captioner of `prep --captions vlm`: load a transformers model, ask it about each crop in
batches, parse its JSON answer robustly, and cache the answers on disk (keyed by image hash + model + prompt).

Any model that transformers loads natively (no trust_remote_code) through AutoProcessor and
AutoModelForImageTextToText works: SmolVLM (the default), Qwen2.5-VL, Qwen3-VL, SmolVLM2, LLaVA, Idefics3, ...
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from sdlora.errors import UsageError, printable
from sdlora.fsutil import atomic_write_text
from sdlora.prep.policy import FEATURES
from sdlora.settings import DEFAULT_CAPTIONER

# The default, SmolVLM-Instruct (2.2B, Apache-2.0, ~4.5 GB in bf16, ~5 GB of GPU memory), is the strongest
# captioner whose processor (Idefics3) loads with our pinned stack as it is. Qwen2.5-VL/Qwen3-VL and SmolVLM2
# processors need torchvision (their video processor), which would move torch off its pin; Qwen2.5-VL-3B is also
# under a non-commercial licence. Where torchvision is installed, pass them with --captioner.
__all__ = ["DEFAULT_CAPTIONER", "AnswerCache", "Captioner", "answer_all", "check", "parse_answer"]
PROMPT = (
    "Describe the person in this photo for an image-generation dataset. Answer with one JSON object and nothing "
    "else, with exactly these keys: "
    + ", ".join(FEATURES)
    + '. Each value is a short phrase of at most six words (for example "short curly red hair", "green eyes", '
    '"black-framed glasses", "blue denim jacket", "city street at night", "smiling", "head and shoulders"), '
    "or null when it is not in the photo (no glasses, no hat) or cannot be seen."
)
CACHE_VERSION = 1  # bump when what is cached changes meaning


def cache_key(image_sha256: str, model: str, prompt: str = PROMPT) -> str:
    """The file name of one answer in the cache: the crop's hash, the model and the question decide it."""
    text = json.dumps([CACHE_VERSION, image_sha256, model, prompt])
    return hashlib.sha256(text.encode()).hexdigest()


class AnswerCache:
    """One JSON file per answer under `folder`; a damaged file is a miss (asked again), never an error."""

    def __init__(self, folder: Path, model: str, prompt: str = PROMPT) -> None:
        self.folder, self.model, self.prompt = Path(folder), model, prompt

    def _path(self, image_sha256: str) -> Path:
        return self.folder / f"{cache_key(image_sha256, self.model, self.prompt)}.json"

    def get(self, image_sha256: str) -> str | None:
        try:
            record = json.loads(self._path(image_sha256).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        answer = record.get("answer") if isinstance(record, dict) else None
        return answer if isinstance(answer, str) else None

    def put(self, image_sha256: str, answer: str) -> None:
        record = {"model": self.model, "image_sha256": image_sha256, "answer": answer}
        self.folder.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self._path(image_sha256), json.dumps(record, ensure_ascii=False) + "\n")


def parse_answer(text: str) -> dict[str, Any] | None:
    """The captioner's answer as {feature: value}: the first JSON object in the text (code fences, prose around it,
    single quotes and trailing commas tolerated), else "key: value" lines; None when nothing known can be read."""
    found: dict[str, Any] = {}
    match = re.search(r"\{.*\}", text, re.DOTALL)
    if match:
        blob = match.group(0)
        for attempt in (blob, re.sub(r",\s*([}\]])", r"\1", blob.replace("'", '"'))):
            try:
                value = json.loads(attempt)
            except ValueError:
                continue
            if isinstance(value, dict):
                found = value
                break
    if not found:
        for line in text.splitlines():
            pair = re.match(r'^\s*[-*"]?\s*([A-Za-z_ ]+?)"?\s*[:=]\s*(.+?)\s*,?\s*$', line)
            if pair:
                found[pair.group(1)] = pair.group(2).strip("\"'")
    answer = {}
    for name, value in found.items():
        feature = re.sub(r"[^a-z]+", "_", str(name).lower()).strip("_").replace("color", "colour")
        if feature in FEATURES:
            answer[feature] = value
    return answer or None


def check(name: str) -> None:
    """Fail now, in one line, when `name` is not a vision-language model transformers can load: before any photo is
    processed. Reads its config and processor (small files); the weights load when a photo needs an answer."""
    _config(name)
    _load_processor(name)


def _config(name: str) -> Any:
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES

    try:
        config = AutoConfig.from_pretrained(name)
    except Exception as exc:  # noqa: BLE001 - missing folder, unknown id, offline, remote code: all one line
        raise UsageError(_cannot(name, exc)) from None
    if config.model_type not in MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES:
        raise UsageError(
            f"--captioner {printable(name)}: a {config.model_type!r} model, not a vision-language model "
            f"transformers loads for image-text-to-text; give one such as {DEFAULT_CAPTIONER}"
        )
    return config


def _load_processor(name: str) -> Any:
    from transformers import AutoProcessor

    try:
        processor = AutoProcessor.from_pretrained(name)
    except Exception as exc:  # noqa: BLE001
        raise UsageError(_cannot(name, exc, "its processor")) from None
    if not hasattr(processor, "image_processor"):
        raise UsageError(f"--captioner {printable(name)}: its processor takes no images; give a vision-language model")
    return processor


def _cannot(name: str, exc: BaseException, what: str = "it") -> str:
    reason = printable((str(exc).strip().splitlines() or [type(exc).__name__])[0])[:240]
    return (
        f"--captioner {printable(name)}: could not load {what} ({reason}); give a local folder or hub id of a "
        f"vision-language model transformers loads without remote code (default {DEFAULT_CAPTIONER})"
    )


class Captioner:
    """A loaded model and processor that answer PROMPT about a batch of images (greedy decoding)."""

    def __init__(self, name: str, device: str, dtype: Any, max_new_tokens: int = 256) -> None:
        from transformers import AutoModelForImageTextToText

        _config(name)
        self.name, self.device, self.max_new_tokens = name, device, max_new_tokens
        self.processor = _load_processor(name)
        try:
            model = AutoModelForImageTextToText.from_pretrained(name, dtype=dtype)
        except Exception as exc:  # noqa: BLE001
            raise UsageError(_cannot(name, exc, "its weights")) from None
        self.model = model.to(device).eval()
        tokenizer = getattr(self.processor, "tokenizer", None)
        if tokenizer is not None:
            tokenizer.padding_side = "left"  # batched generation continues every row from its end

    def _prompt(self) -> str:
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": PROMPT}]}]
        if getattr(self.processor, "chat_template", None):
            return self.processor.apply_chat_template(messages, add_generation_prompt=True)
        image = getattr(self.processor, "image_token", "<image>")
        return f"{image}\n{PROMPT}\n"

    def ask(self, images: list[Any]) -> list[str]:
        """One answer (raw text) per PIL image."""
        import torch

        prompt = self._prompt()
        inputs = self.processor(
            text=[prompt] * len(images), images=[[image] for image in images], return_tensors="pt", padding=True
        )
        inputs = {k: v.to(self.device) if hasattr(v, "to") else v for k, v in inputs.items()}
        if "pixel_values" in inputs and inputs["pixel_values"].is_floating_point():
            inputs["pixel_values"] = inputs["pixel_values"].to(self.model.dtype)
        with torch.inference_mode():
            out = self.model.generate(**inputs, max_new_tokens=self.max_new_tokens, do_sample=False)
        new = out[:, inputs["input_ids"].shape[1] :]
        return [text.strip() for text in self.processor.batch_decode(new, skip_special_tokens=True)]


def answer_all(
    items: list[tuple[str, Any]],
    cache: AnswerCache,
    load: Callable[[], Captioner],
    batch_size: int,
    progress: bool,
) -> list[str]:
    """The answer for each (image sha256, PIL image): from the cache, else asked in batches (the model is loaded
    only when some answer is missing) and cached at once, so an interrupted run keeps what it got."""
    answers = [cache.get(sha) for sha, _ in items]
    missing = [i for i, answer in enumerate(answers) if answer is None]
    if not missing:
        return [a or "" for a in answers]
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    captioner = load()
    columns = (TextColumn("captions"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    with Progress(*columns, console=Console(stderr=True), disable=not progress) as bar:
        task = bar.add_task("captions", total=len(missing))
        for start in range(0, len(missing), batch_size):
            chunk = missing[start : start + batch_size]
            for i, text in zip(chunk, captioner.ask([items[i][1] for i in chunk]), strict=True):
                answers[i] = text
                cache.put(items[i][0], text)
            bar.advance(task, len(chunk))
    return [a or "" for a in answers]
