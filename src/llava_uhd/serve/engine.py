"""The model side of the server: a checked request -> a :class:`Job`; a batch of jobs -> streamed answers.

:meth:`Engine.prepare` runs on a request thread: each image's bytes are hashed, and an image the
feature cache holds skips decoding, slicing, ViT and resampler; a new one is decoded, planned and cut
into pixels by the processor (the calls training uses), then the conversation is tokenized around the
plans. Every limit is checked here, before the request waits for the model.

:meth:`Engine.run_batch` runs on the model thread: the new images of the whole batch go through the ViT
and the resampler in one packed call (pieces of any slice counts together, docs/INTERFACES.md), their
tokens enter the cache, and one ``generate`` call answers every job, left-padded, with the tokens of all
images passed as ``image_features``. Each row streams its own text, stops on its own ``max_tokens``, stop
strings or end token, and stops at once when its client goes away. Beam search cannot stream (a beam's
text is not final until the search ends), so a beam job's answer arrives whole when its batch is done,
cut by the same stop rules; its batch stops early only when every client of it has gone.
"""

from __future__ import annotations

import itertools
import logging
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import StoppingCriteria, StoppingCriteriaList

from llava_uhd.errors import LlavaUHDError
from llava_uhd.images import probe_image_size
from llava_uhd.inference.generate import GenerationOptions, seeded
from llava_uhd.inference.image_cache import ImageFeatureCache, ImageFeatures, image_key
from llava_uhd.processing import ImageBatch
from llava_uhd.serve.image_urls import image_bytes
from llava_uhd.serve.limits import ServerLimits, bad_request, over_limit
from llava_uhd.serve.metrics import Metrics
from llava_uhd.serve.schema import ChatRequest
from llava_uhd.slicing import SlicePlan
from llava_uhd.tokens import pad_token_id

logger = logging.getLogger(__name__)
_REPLACEMENT = "\ufffd"  # what decoding shows for a character whose bytes are not all generated yet


@dataclass(frozen=True)
class Delta:
    """New answer text."""

    text: str


@dataclass(frozen=True)
class Done:
    """The answer is complete: ``stop`` (end token or a stop string) or ``length`` (max_tokens)."""

    finish_reason: str
    completion_tokens: int


@dataclass(frozen=True)
class Failed:
    """The job could not be answered."""

    status: int
    message: str


Event = Delta | Done | Failed


@dataclass(frozen=True)
class PreparedImage:
    """One image of a job: its cache key and plan, and either its cached tokens or its pixels to encode."""

    key: str
    plan: SlicePlan
    entry: ImageFeatures | None
    pixels: ImageBatch | None


@dataclass(frozen=True)
class Usage:
    """What the prompt of a job takes: tokens in all, tokens of images, slices and ViT patches."""

    prompt_tokens: int
    image_tokens: int
    slices: int
    vit_patches: int


_ids = itertools.count()


@dataclass(eq=False)
class Job:
    """One request waiting for, or in, a batch. ``emit`` delivers its events; ``cancelled`` stops it."""

    input_ids: list[int]
    images: list[PreparedImage]
    usage: Usage
    max_tokens: int
    temperature: float
    top_p: float | None
    seed: int | None
    stop: tuple[str, ...]
    num_beams: int = 1
    emit: Callable[[Event], None] = lambda event: None
    cancelled: threading.Event = field(default_factory=threading.Event)
    enqueued: float = 0.0
    number: int = field(default_factory=lambda: next(_ids))

    @property
    def batch_key(self) -> tuple:
        """Jobs batch together only when one ``generate`` call can serve them all: greedy with greedy,
        sampling with the same settings, beam search of one width with the same; a seeded sampling job
        runs alone, so its seed reproduces it."""
        if self.temperature == 0:
            return ("greedy", self.num_beams)
        alone = self.number if self.seed is not None else None
        return ("sample", self.num_beams, self.temperature, self.top_p, alone)


@dataclass(frozen=True)
class Defaults:
    """Decoding settings for requests that do not give them (``llava-uhd serve`` flags)."""

    max_tokens: int = 256
    temperature: float = 0.0
    top_p: float | None = None
    seed: int | None = None
    num_beams: int = 1


class Engine:
    """A loaded model and processor, the image-feature cache, the limits and the metrics of one server."""

    def __init__(
        self,
        model: Any,
        processor: Any,
        *,
        limits: ServerLimits,
        cache: ImageFeatureCache,
        metrics: Metrics,
        defaults: Defaults,
        allow_remote_images: bool = False,
        name: str = "llava-uhd",
    ) -> None:
        self.model = model
        self.processor = processor
        self.limits = limits
        self.cache = cache
        self.metrics = metrics
        self.defaults = defaults
        self.allow_remote_images = allow_remote_images
        self.name = name
        self.context_length = int(model.config.text_config.max_position_embeddings)
        # what changes an image's plan or pixels besides its bytes (the key of the feature cache)
        self.settings = f"{name}|{processor.slicing}|{processor.resize_mode}|{processor.num_queries}"

    # ---- request threads -------------------------------------------------------------------------

    def prepare(self, request: ChatRequest) -> Job:
        """A checked request -> a job ready for the model; every problem is an ``ApiError``."""
        limits = self.limits
        if len(request.image_urls) > limits.max_images:
            raise over_limit(
                "the number of images", len(request.image_urls), limits.max_images, "--max-images", "messages"
            )
        images = [
            self._image(image_bytes(url, param, limits, self.allow_remote_images), param)
            for url, param in zip(request.image_urls, request.image_params, strict=True)
        ]
        plans = [image.plan for image in images]
        try:
            encoded = self.processor.encode_conversation(
                request.turns, plans, self.model.config.template, generation_prompt=True
            )
        except LlavaUHDError as exc:
            raise bad_request(str(exc), "messages") from None
        if encoded.num_visual_tokens > limits.max_visual_tokens:
            raise over_limit(
                "the visual tokens of the images",
                encoded.num_visual_tokens,
                limits.max_visual_tokens,
                "--max-visual-tokens",
                "messages",
            )
        prompt = len(encoded.input_ids)
        if prompt > limits.max_prompt_tokens:
            raise over_limit(
                "the prompt length in tokens",
                prompt,
                limits.max_prompt_tokens,
                "--max-prompt-tokens",
                "messages",
            )
        max_tokens = self._max_tokens(request.max_tokens, prompt)
        num_beams = self.defaults.num_beams if request.num_beams is None else request.num_beams
        if num_beams > limits.max_beams:
            raise over_limit("num_beams", num_beams, limits.max_beams, "--max-beams", "num_beams")
        return Job(
            input_ids=list(encoded.input_ids),
            images=images,
            usage=Usage(
                prompt_tokens=prompt,
                image_tokens=encoded.num_visual_tokens,
                slices=sum(p.num_slices for p in plans),
                vit_patches=sum(p.vit_patches for p in plans),
            ),
            max_tokens=max_tokens,
            temperature=self.defaults.temperature if request.temperature is None else request.temperature,
            top_p=self.defaults.top_p if request.top_p is None else request.top_p,
            seed=self.defaults.seed if request.seed is None else request.seed,
            stop=request.stop,
            num_beams=num_beams,
        )

    def _max_tokens(self, asked: int | None, prompt: int) -> int:
        room = self.context_length - prompt
        if asked is None:
            if room < 1:
                raise bad_request(
                    f"the prompt takes {prompt} tokens, the whole context of this model ({self.context_length})",
                    "messages",
                    "context_length_exceeded",
                )
            return min(self.defaults.max_tokens, self.limits.max_tokens, room)
        if asked > self.limits.max_tokens:
            raise over_limit("max_tokens", asked, self.limits.max_tokens, "--max-tokens-limit", "max_tokens")
        if asked > room:
            raise bad_request(
                f"the prompt ({prompt} tokens) plus max_tokens ({asked}) is over this model's context of "
                f"{self.context_length} tokens",
                "max_tokens",
                "context_length_exceeded",
            )
        return asked

    def _image(self, data: bytes, param: str) -> PreparedImage:
        """A cached image as it is, or a new one decoded, planned and cut into pixels."""
        key = image_key(data, self.settings)
        entry = self.cache.get(key)
        if entry is not None:
            return PreparedImage(key, entry.plan, entry, None)
        start = time.perf_counter()
        try:
            width, height = probe_image_size(data, max_pixels=sys.maxsize)
            if width * height > self.limits.max_image_pixels:
                raise over_limit(
                    f"the image's pixel count ({width}x{height})",
                    width * height,
                    self.limits.max_image_pixels,
                    "--max-image-pixels",
                    param,
                )
            loaded, plans = self.processor.load_and_plan([data])
            decoded = time.perf_counter()
            pixels = self.processor.encode(loaded, plans)
        except LlavaUHDError as exc:
            raise bad_request(f"the image cannot be used: {exc}", param, "invalid_image") from None
        self.metrics.add_stage("image_decode", decoded - start)
        self.metrics.add_stage("slicing", time.perf_counter() - decoded)
        return PreparedImage(key, plans[0], None, pixels)

    # ---- the model thread ------------------------------------------------------------------------

    def run_batch(self, jobs: list[Job]) -> None:
        """Answer ``jobs`` together; a failure fails this batch only (the model thread goes on)."""
        jobs = [job for job in jobs if not job.cancelled.is_set()]
        if not jobs:
            return
        try:
            with torch.inference_mode():
                features = self._encode_new_images(jobs)
                self._generate(jobs, features)
        except Exception as exc:  # noqa: BLE001 - the model thread must outlive any one batch
            logger.exception("batch of %d failed", len(jobs))
            for job in jobs:
                job.emit(Failed(500, f"the model failed on this batch ({type(exc).__name__}: {exc})"))

    def _encode_new_images(self, jobs: list[Job]) -> list[torch.Tensor | None]:
        """(N_j, Q, D) tokens of each job's images (None without images), encoding the new ones at once."""
        new: dict[str, PreparedImage] = {}
        encoded: dict[str, ImageFeatures] = {}
        for image in (image for job in jobs for image in job.images):
            if image.entry is not None or image.key in new or image.key in encoded:
                continue
            # A request that arrived while an earlier batch was encoding the same image missed the cache
            # then; that batch has put it in since, so the ViT runs once per image however requests race.
            entry = self.cache.get(image.key, count=False)
            if entry is not None:
                encoded[image.key] = entry
            else:
                new[image.key] = image
        if new:
            device = self.model.device
            pixel_values = torch.cat([im.pixels.pixel_values for im in new.values()]).to(device)
            grids = torch.cat([im.pixels.piece_grids for im in new.values()]).to(device)
            start = time.perf_counter()
            vit = self.model.vision_tower(pixel_values, grids)  # (Pt, Dv)
            _sync(device)
            middle = time.perf_counter()
            tokens = self.model.resampler(vit, grids)  # (N, Q, D)
            _sync(device)
            self.metrics.add_stage("vit", middle - start)
            self.metrics.add_stage("resampler", time.perf_counter() - middle)
            self.metrics.add_encoded(len(new))
            offset = 0
            for key, image in new.items():
                pieces = image.plan.num_slices + 1
                entry = ImageFeatures(image.plan, tokens[offset : offset + pieces].clone())
                offset += pieces
                encoded[key] = entry
                self.cache.put(key, entry)
        result: list[torch.Tensor | None] = []
        for job in jobs:
            parts = [(image.entry or encoded[image.key]).features for image in job.images]
            result.append(torch.cat(parts) if parts else None)
        return result

    def _generate(self, jobs: list[Job], features: list[torch.Tensor | None]) -> None:
        tokenizer = self.processor.tokenizer
        device = self.model.device
        length = max(len(job.input_ids) for job in jobs)
        input_ids = torch.full((len(jobs), length), pad_token_id(tokenizer), dtype=torch.long)
        attention_mask = torch.zeros_like(input_ids)
        for i, job in enumerate(jobs):  # left padding: every row's answer starts at the same column
            input_ids[i, length - len(job.input_ids) :] = torch.tensor(job.input_ids)
            attention_mask[i, length - len(job.input_ids) :] = 1
        present = [f for f in features if f is not None]
        first = jobs[0]
        options = GenerationOptions(
            max_new_tokens=max(job.max_tokens for job in jobs),
            num_beams=first.num_beams,
            temperature=first.temperature,
            top_p=first.top_p,
        )
        rows = [_Row(job, tokenizer) for job in jobs]
        inputs = {
            "input_ids": input_ids.to(device),
            "attention_mask": attention_mask.to(device),
            "image_features": torch.cat(present) if present else None,
            "pad_token_id": pad_token_id(tokenizer),
            "eos_token_id": tokenizer.eos_token_id,
            **options.generate_kwargs(),
        }
        with seeded(first.seed if first.temperature > 0 else None, device):
            if first.num_beams == 1:
                streamer = _Streamer(rows, self.metrics, device)
                self.model.generate(
                    **inputs, streamer=streamer, stopping_criteria=StoppingCriteriaList([_RowsDone(rows)])
                )
                return
            start = time.perf_counter()
            output = self.model.generate(**inputs, stopping_criteria=StoppingCriteriaList([_AllGone(rows)]))
        for row, tokens in zip(rows, output[:, length:].tolist(), strict=True):
            for token in tokens:
                row.add(token)
            row.end()
        took = time.perf_counter() - start
        self.metrics.add_stage("decode_steps", took)  # prefill and steps: a beam search has no first token
        self.metrics.add_batch(len(rows), sum(len(r.tokens) for r in rows), took)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":  # kernels run asynchronously: wait before reading the clock
        torch.cuda.synchronize(device)


class _Row:
    """One job's answer as its tokens arrive: the text, the part already sent, the stop checks."""

    def __init__(self, job: Job, tokenizer: Any) -> None:
        self.job = job
        self.tokenizer = tokenizer
        self.tokens: list[int] = []
        self.sent = 0
        self.finished = False
        # text that could be the start of a stop string is held back until it cannot be
        self.hold = max((len(s) for s in job.stop), default=1) - 1

    def add(self, token: int) -> None:
        if self.finished:
            return
        if self.job.cancelled.is_set():
            self.finished = True
            return
        if token == self.tokenizer.eos_token_id:
            self._finish("stop")
            return
        self.tokens.append(token)
        text = self.tokenizer.decode(self.tokens, skip_special_tokens=True).lstrip()
        hits = [text.find(s) for s in self.job.stop if s in text]
        if hits:
            self._send(text[: min(hits)])
            self._finish("stop")
        elif len(self.tokens) >= self.job.max_tokens:
            self._send(text)
            self._finish("length")
        else:
            safe = len(text) - self.hold
            while safe > self.sent and text[safe - 1] == _REPLACEMENT:
                safe -= 1
            self._send(text[:safe])

    def end(self) -> None:
        """Generation stopped (the batch's longest request is done): close this row if still open."""
        if not self.finished:
            text = self.tokenizer.decode(self.tokens, skip_special_tokens=True).lstrip()
            self._send(text)
            self._finish("length")

    def _send(self, text: str) -> None:
        if len(text) > self.sent:
            self.job.emit(Delta(text[self.sent :]))
            self.sent = len(text)

    def _finish(self, reason: str) -> None:
        self.finished = True
        if not self.job.cancelled.is_set():
            self.job.emit(Done(reason, len(self.tokens)))


class _Streamer:
    """What ``generate`` calls with the prompt and then each step's (B,) new tokens."""

    def __init__(self, rows: list[_Row], metrics: Metrics, device: torch.device) -> None:
        self.rows = rows
        self.metrics = metrics
        self.device = device
        self.started = time.perf_counter()
        self.first_token: float | None = None
        self.prompt_seen = False

    def put(self, value: torch.Tensor) -> None:
        if not self.prompt_seen:  # generate hands over the prompt ids first
            self.prompt_seen = True
            return
        if self.first_token is None:
            self.first_token = time.perf_counter()
            self.metrics.add_stage("prefill", self.first_token - self.started)
        for row, token in zip(self.rows, value.view(-1).tolist(), strict=True):
            row.add(int(token))

    def end(self) -> None:
        for row in self.rows:
            row.end()
        now = time.perf_counter()
        if self.first_token is not None:
            self.metrics.add_stage("decode_steps", now - self.first_token)
        self.metrics.add_batch(len(self.rows), sum(len(r.tokens) for r in self.rows), now - self.started)


class _RowsDone(StoppingCriteria):
    """Per row: done when its answer is complete or its client has gone."""

    def __init__(self, rows: list[_Row]) -> None:
        self.rows = rows

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        done = [row.finished or row.job.cancelled.is_set() for row in self.rows]
        return torch.tensor(done, dtype=torch.bool, device=input_ids.device)


class _AllGone(StoppingCriteria):
    """Beam search: stop every beam once no client of the batch is left (rows are batch x beams)."""

    def __init__(self, rows: list[_Row]) -> None:
        self.rows = rows

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        gone = all(row.job.cancelled.is_set() for row in self.rows)
        return torch.full((input_ids.shape[0],), gone, dtype=torch.bool, device=input_ids.device)
