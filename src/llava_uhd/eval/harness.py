"""A LLaVA-UHD model as the standard evaluation harnesses call it.

:class:`HarnessModel` answers lmms-eval's two request kinds (``generate_until``, ``loglikelihood``),
whose ``request.args`` are ``(context, gen_kwargs, doc_to_visual, doc_id, task, split)`` and ``(context,
doc_to_target, doc_to_visual, doc_id, task, split)`` (or ``(context, continuation)`` without a document:
the unconditional scores of mutual-information multiple choice), the documents coming from ``task_dict``
(lmms-eval sets it on the model), and VLMEvalKit's ``generate_inner(message, dataset)`` over its
interleaved message list of ``{"type": "image" | "text", "value": ...}``.
:mod:`llava_uhd.eval.lmms_eval_model` registers it with lmms-eval as ``llava_uhd``; neither harness is
needed to use it.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from llava_uhd.errors import EvalInputError
from llava_uhd.inference.batch import Request, answer_batch
from llava_uhd.templates import IGNORE_INDEX, IMAGE_TOKEN, Turn

_GENERATION_KEYS = ("max_new_tokens", "num_beams", "temperature", "top_p")


class HarnessModel:
    """The model of a saved folder (the bundled one when ``pretrained`` is None), answering harness requests.

    ``batch_size`` requests with the same generation settings go through one ``generate`` call;
    ``max_slices`` caps the slices per image (1: the overview alone).
    """

    def __init__(
        self,
        pretrained: str | Path | None = None,
        *,
        device: str | None = None,
        batch_size: int | str = 1,
        max_slices: int | str | None = None,
        max_new_tokens: int | str = 128,
        **_harness_options: Any,
    ) -> None:
        from llava_uhd.auto import load_pretrained
        from llava_uhd.bundled import model_dir

        torch_device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        # bfloat16 where the GPU computes in it; CPUs emulate it slower than float32
        bf16 = torch_device.type == "cuda" and torch.cuda.is_bf16_supported()
        self.model, self.processor = load_pretrained(
            model_dir(pretrained), device=torch_device, dtype=torch.bfloat16 if bf16 else torch.float32
        )
        self.batch_size = _positive_int("batch_size", batch_size)
        self.max_slices = None if max_slices is None else _positive_int("max_slices", max_slices)
        self.max_new_tokens = _positive_int("max_new_tokens", max_new_tokens)
        self.task_dict: dict[str, Any] = {}

    # --- lmms-eval ---------------------------------------------------------------------------------------

    def _doc(self, task: str, split: str, doc_id: int) -> Any:
        try:
            return self.task_dict[task][split][doc_id]
        except (KeyError, IndexError):
            raise EvalInputError(f"no document {doc_id} in task {task!r} split {split!r}") from None

    def _visuals(self, doc_to_visual: Any, task: str, split: str, doc_id: int) -> tuple[Any, ...]:
        visuals = doc_to_visual(self._doc(task, split, doc_id)) if callable(doc_to_visual) else doc_to_visual
        return tuple(visuals or ())

    def _options(self, gen_kwargs: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
        until = gen_kwargs.get("until") or []
        options = {"max_new_tokens": self.max_new_tokens} | {
            k: gen_kwargs[k] for k in _GENERATION_KEYS if gen_kwargs.get(k) is not None
        }
        if gen_kwargs.get("do_sample") is False:
            # as transformers' generate: no sampling means greedy, whatever temperature the task sets
            options.pop("temperature", None)
            options.pop("top_p", None)
        return options, [until] if isinstance(until, str) else list(until)

    def generate_until(self, requests: Sequence[Any]) -> list[str]:
        """The answer to each request, cut at the first of its ``until`` strings."""
        answers: list[str] = []
        pending: list[tuple[Request, list[str]]] = []
        pending_options: dict[str, Any] | None = None
        for request in requests:
            context, gen_kwargs, doc_to_visual, doc_id, task, split = request.args
            options, until = self._options(dict(gen_kwargs or {}))
            if pending and (options != pending_options or len(pending) == self.batch_size):
                answers += self._generate(pending, pending_options or {})
                pending = []
            pending.append((Request(self._visuals(doc_to_visual, task, split, doc_id), context), until))
            pending_options = options
        if pending:
            answers += self._generate(pending, pending_options or {})
        return answers

    def _generate(self, pending: list[tuple[Request, list[str]]], options: dict[str, Any]) -> list[str]:
        results = answer_batch(
            self.model, self.processor, [r for r, _ in pending], max_slices=self.max_slices, **options
        )
        texts = []
        for (_, until), result in zip(pending, results, strict=True):
            if result.error is not None:
                raise EvalInputError(result.error)
            text = result.text or ""
            for stop in until:
                if stop:
                    text = text.split(stop, 1)[0]
            texts.append(text)
        return texts

    def loglikelihood(self, requests: Sequence[Any]) -> list[tuple[float, bool]]:
        """``(log p(continuation | context, images), whether greedy decoding gives it)`` per request.

        The continuation is the assistant's answer in the model's template, so its tokens, and the end of
        turn the template puts after them, are the ones scored (the labels of that turn).
        """
        return [self._loglikelihood(*request.args) for request in requests]

    def _loglikelihood(
        self,
        context: str,
        doc_to_target: Any,
        doc_to_visual: Any = None,
        doc_id: int = 0,
        task: str = "",
        split: str = "",
    ) -> tuple[float, bool]:
        continuation = (
            doc_to_target if isinstance(doc_to_target, str) else doc_to_target(self._doc(task, split, doc_id))
        )
        images = self._visuals(doc_to_visual, task, split, doc_id) if doc_to_visual is not None else ()
        question = context if IMAGE_TOKEN in context else f"{IMAGE_TOKEN}\n" * len(images) + context
        # lmms-eval's multiple choice puts its target delimiter (a space) before each choice; the
        # template already separates the answer from its role, so the answer is the choice alone
        prepared = self.processor.prepare(
            [Turn("user", question), Turn("assistant", str(continuation).lstrip())],
            images,
            self.model.config.template,
            max_slices=self.max_slices,
        )
        inputs = {k: v.to(self.model.device) for k, v in prepared.model_inputs().items()}
        labels = torch.tensor(prepared.text.labels, device=self.model.device)
        with torch.inference_mode():
            logits = self.model(**inputs).logits[0].float()  # (T, V)
        # position t predicts token t + 1
        targets = labels[1:]
        scored = targets != IGNORE_INDEX
        log_probs = torch.log_softmax(logits[:-1][scored], dim=-1)
        wanted = targets[scored]
        total = log_probs.gather(1, wanted[:, None]).sum().item()
        greedy = bool((log_probs.argmax(dim=-1) == wanted).all().item())
        return total, greedy

    # --- VLMEvalKit --------------------------------------------------------------------------------------

    def generate_inner(self, message: Sequence[dict[str, Any]], dataset: str | None = None) -> str:
        """The answer to VLMEvalKit's interleaved ``message``: each image becomes an ``<image>`` placeholder
        where it stands, text pieces are joined by newlines."""
        images, parts = [], []
        for number, piece in enumerate(message):
            kind, value = piece.get("type"), piece.get("value")
            if kind == "image":
                images.append(value)
                parts.append(IMAGE_TOKEN)
            elif kind == "text":
                parts.append(str(value))
            else:
                raise EvalInputError(f"message piece {number}: type must be 'image' or 'text', got {kind!r}")
        result = answer_batch(
            self.model,
            self.processor,
            [Request(tuple(images), "\n".join(parts))],
            max_slices=self.max_slices,
            max_new_tokens=self.max_new_tokens,
        )[0]
        if result.error is not None:
            raise EvalInputError(result.error)
        return result.text or ""


def _positive_int(name: str, value: int | str) -> int:
    """A model argument as lmms-eval passes it (an int, or the text of ``--model_args``), checked."""
    try:
        number = int(str(value))  # "1.5" and "auto" are errors, not 1
    except ValueError:
        raise EvalInputError(f"{name} must be a positive integer, got {value!r}") from None
    if number < 1:
        raise EvalInputError(f"{name} must be a positive integer, got {value!r}")
    return number
