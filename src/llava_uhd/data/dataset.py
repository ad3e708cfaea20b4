"""The LLaVA training dataset: records in, model-ready samples out (images sliced in ``__getitem__``, so in
DataLoader workers).

Every sample is made by :meth:`~llava_uhd.processing.LlavaUHDProcessor.prepare`, the call inference
makes with the same conversation up to the answer: the image files go to the processor, which decodes,
plans and patchifies them as it does at inference (JPEGs at the DCT scale the plan needs, in fast mode),
so a training sample's prompt, pixels and grids are the inference inputs. Only augmentation, when
enabled, decodes here first, because it changes the image before planning.

A sample is a dict: ``id``; ``input_ids`` and ``labels`` (T,) long; ``pixel_values`` (Pt, C*P*P) float32
and ``piece_grids`` (N, 2) long (empty for text-only samples); ``pieces_per_image`` (n_images,) long;
``num_text_tokens`` and ``num_visual_tokens`` (ints, for the length sampler).

Bad records (missing or corrupt image, an image path outside the image folder, malformed turns,
image-count mismatch, a visual block longer than ``max_length``, a JSONL line that is not JSON) raise
:class:`~llava_uhd.errors.BadSampleError` naming the id and reason with ``on_bad_sample="error"``.
With ``"skip"`` a bad record is reported once (its id, index and reason appended to the skip log, JSONL)
and never stands in for another: :meth:`LlavaDataset.usable_indices` checks every record up front from
the text and the image headers, so training draws each good record once per epoch and no bad one. A
record whose pixels turn out corrupt only when decoded reads as an empty sample (one pad token, no
label, no image): it adds nothing to the loss and its batch keeps its size on every rank. Only typed
errors are caught; a bug still crashes.

Image paths are resolved (``..`` and symlinks followed) and must land inside the image folder (the current
folder when there is none): a record cannot make training read ``/etc/passwd`` or ``../../secret.jpg``.
``allow_outside_image_folder`` lifts that for datasets that keep their images elsewhere.
"""

from __future__ import annotations

import json
import logging
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from llava_uhd.config import Preset
from llava_uhd.data.augment import AugmentConfig, augment_image
from llava_uhd.data.conversation import Conversation, parse_record, record_id, truncate
from llava_uhd.errors import (
    BadSampleError,
    ConfigError,
    ImageLoadError,
    ImageSizeError,
    PlaceholderMismatchError,
    PlanLimitError,
    TokenBudgetError,
)
from llava_uhd.images import ImageSource, load_image, probe_image_size
from llava_uhd.processing import LlavaUHDProcessor
from llava_uhd.templates import IGNORE_INDEX, MalformedConversationError, Template, get_template
from llava_uhd.tokens import pad_token_id

logger = logging.getLogger(__name__)

BadSamplePolicy = Literal["error", "skip"]

# The image failures a record can cause, turned into a BadSampleError for the skip policy.
_IMAGE_ERRORS = (ImageLoadError, ImageSizeError, PlanLimitError, TokenBudgetError)
# Per-sample RNG seeds mix (seed, epoch, index) with these odd multipliers so nearby triples do not collide.
_EPOCH_MIX, _INDEX_MIX = 1_000_003, 7_919


def read_records(path: str | Path) -> tuple[list[Any], dict[int, str]]:
    """The records of a LLaVA JSON file (a list of records) or JSONL (one record per line, blank lines
    ignored), and the JSONL lines that hold no record.

    A JSONL line that is not UTF-8 text or not valid JSON keeps its place in the records as ``None``; the
    second result maps its index to the reason, which names the file and line. A JSON file is one
    document, so any fault in it is an error.

    Raises:
        ConfigError: the file is missing or unreadable, or a JSON file is not a list of records.
    """
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{p}: no such data file")
    try:
        raw = p.read_bytes()
    except OSError as exc:
        raise ConfigError(f"{p}: cannot be read ({exc.strerror or exc})") from None
    if p.suffix == ".jsonl":
        records: list[Any] = []
        unreadable: dict[int, str] = {}
        for line_no, line in enumerate(raw.splitlines(), 1):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line.decode("utf-8")))
            except UnicodeDecodeError as exc:
                unreadable[len(records)] = f"{p}:{line_no}: not UTF-8 text ({exc.reason} at byte {exc.start})"
                records.append(None)
            except json.JSONDecodeError as exc:
                unreadable[len(records)] = f"{p}:{line_no}: not valid JSON: {exc.msg}"
                records.append(None)
        return records, unreadable
    try:
        data = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{p}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{p}: not valid JSON at line {exc.lineno}: {exc.msg}") from None
    if not isinstance(data, list):
        raise ConfigError(f"{p}: a LLaVA JSON file must hold a list of records, got {type(data).__name__}")
    return data, {}


def load_records(path: str | Path) -> list[dict[str, Any]]:
    """Read a LLaVA JSON file (a list of records) or JSONL (one record per line, blank lines ignored).

    Raises:
        ConfigError: as :func:`read_records`, and for the first JSONL line that holds no record.
    """
    records, unreadable = read_records(path)
    if unreadable:
        raise ConfigError(unreadable[min(unreadable)])
    return records


@dataclass
class SkipLog:
    """Where bad samples are reported: one JSON line ``{"id", "index", "reason"}`` each, and a counter.

    A record is reported once: :meth:`record` leaves out a record this log already holds (by id and
    index), in this process or in the file, so a record that fails again in a later epoch, in another
    DataLoader worker or after a resume adds nothing. Each line is appended in one call, so workers can
    share the file; a record is read by one worker of one rank per epoch, so no two processes report the
    same record at once. :func:`read_skip_log` gives the whole run's entries, ``count`` this process's.
    """

    path: Path | None = None
    count: int = 0
    _seen: set[tuple[str, int]] = field(default_factory=set, repr=False)

    def record(self, sample_id: str, index: int, reason: str) -> None:
        """Report a bad record, unless it has been reported already."""
        self.record_all([(sample_id, index, reason)])

    def record_all(self, entries: Sequence[tuple[str, int, str]]) -> None:
        """Report bad records ``(id, index, reason)``, each unless it has been reported already."""
        if all((sample_id, index) in self._seen for sample_id, index, _ in entries):
            return
        if self.path is not None:
            self._seen.update((e["id"], e["index"]) for e in read_skip_log(self.path))
        lines = []
        for sample_id, index, reason in entries:
            if (sample_id, index) in self._seen:
                continue
            self._seen.add((sample_id, index))
            self.count += 1
            logger.warning("skipping sample %r (index %d): %s", sample_id, index, reason)
            lines.append(json.dumps({"id": sample_id, "index": index, "reason": reason}) + "\n")
        if self.path is not None and lines:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with self.path.open("a", encoding="utf-8") as f:
                f.write("".join(lines))


def read_skip_log(path: str | Path) -> list[dict[str, Any]]:
    """Every entry of a skip log (empty when the file does not exist)."""
    p = Path(path)
    if not p.is_file():
        return []
    return [json.loads(line) for line in p.read_text(encoding="utf-8").splitlines() if line.strip()]


class LlavaDataset(torch.utils.data.Dataset):
    """LLaVA records -> samples (see the module docstring for the sample's keys).

    Args:
        records: a list of records, or a path to a LLaVA JSON / JSONL file.
        image_folder: the folder record image paths are relative to (None: the current folder).
        processor: the :class:`~llava_uhd.processing.LlavaUHDProcessor` that makes every sample
            (tokenizer with ``<image>``, preset, resize mode, token budget).
        template: ``plain``, ``vicuna_v1``, ``chat_template`` or a template object.
        max_length: the most tokens of a sample (text + visual); longer text is cut, never a visual block.
        overview_only: stage 1 (docs/design.md section 7): one piece per image, the overview.
        on_bad_sample: ``"error"`` raises; ``"skip"`` reports the record once and reads it as an empty
            sample (see :meth:`usable_indices`); a JSONL line that is not JSON is then a bad record too.
        skip_log: the JSONL file bad records are reported in (``"skip"`` only).
        augment: image augmentations (off by default, as in the released recipe).
        seed: seeds the augmentations together with the epoch (:meth:`set_epoch`) and index.
        allow_outside_image_folder: accept absolute image paths and paths that resolve outside
            ``image_folder``; by default such a record is a bad sample.
    """

    def __init__(
        self,
        records: Sequence[Mapping[str, Any]] | str | Path,
        image_folder: str | Path | None,
        processor: LlavaUHDProcessor,
        template: str | Template = "vicuna_v1",
        max_length: int = 2048,
        overview_only: bool = False,
        on_bad_sample: BadSamplePolicy = "error",
        skip_log: str | Path | None = None,
        augment: AugmentConfig | None = None,
        seed: int = 0,
        allow_outside_image_folder: bool = False,
    ) -> None:
        if on_bad_sample not in ("error", "skip"):
            raise ConfigError(f"on_bad_sample must be 'error' or 'skip', got {on_bad_sample!r}")
        if max_length < 1:
            raise ConfigError(f"max_length must be >= 1, got {max_length!r}")
        # index -> why a JSONL line holds no record (kept in place as None; "skip" only)
        self._unreadable: dict[int, str] = {}
        if not isinstance(records, str | Path):
            self.records = list(records)
        elif on_bad_sample == "error":
            self.records = load_records(records)
        else:
            self.records, self._unreadable = read_records(records)
        self.image_folder = Path(image_folder) if image_folder is not None else None
        # resolved once: the root every image path must stay under
        self._image_root = (self.image_folder or Path.cwd()).resolve()
        self.allow_outside_image_folder = allow_outside_image_folder
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.preset: Preset = processor.preset
        self.template = get_template(template)
        self.max_length = max_length
        self.overview_only = overview_only
        self.on_bad_sample = on_bad_sample
        self.skips = SkipLog(Path(skip_log) if skip_log is not None else None)
        self.augment = augment or AugmentConfig()
        self.seed = seed
        self.epoch = 0
        self._checked: list[int | BadSampleError] | None = None

    def __len__(self) -> int:
        return len(self.records)

    def set_epoch(self, epoch: int) -> None:
        """Make augmentations depend on the epoch (call before each epoch, like DistributedSampler's)."""
        self.epoch = epoch

    @property
    def skipped(self) -> int:
        """Bad records this process reported (for the whole run across workers, read the skip log)."""
        return self.skips.count

    def __getitem__(self, index: int) -> dict[str, Any]:
        """The sample of record ``index``; with ``"skip"``, an empty sample for a bad record (reported once)."""
        if self.on_bad_sample == "error":
            return self.build(index)
        try:
            return self.build(index)
        except BadSampleError as exc:
            self.skips.record(exc.sample_id, index, exc.reason)
            return self._empty_sample(exc.sample_id)

    def _empty_sample(self, sample_id: str) -> dict[str, Any]:
        """What a bad record reads as under ``"skip"``: one pad token without a label, no image."""
        images = self.processor.encode([], [])
        return {
            "id": sample_id,
            "input_ids": torch.tensor([pad_token_id(self.tokenizer)], dtype=torch.long),
            "labels": torch.tensor([IGNORE_INDEX], dtype=torch.long),
            "pixel_values": images.pixel_values,
            "piece_grids": images.piece_grids,
            "pieces_per_image": images.pieces_per_image,
            "num_text_tokens": 1,
            "num_visual_tokens": 0,
        }

    def _image_path(self, relative: str, sample_id: str) -> Path:
        """The file a record's image path names, resolved; outside the image folder it is a bad sample."""
        try:
            path = (self._image_root / relative).resolve()  # an absolute path replaces the root
        except (OSError, ValueError, RuntimeError) as exc:  # a NUL byte, a symlink loop
            raise BadSampleError(sample_id, f"image {relative!r}: not a usable path ({exc})") from None
        if not self.allow_outside_image_folder and not path.is_relative_to(self._image_root):
            raise BadSampleError(
                sample_id,
                f"image {relative!r} resolves to {path}, outside the image folder {self._image_root} "
                "(set data.allow_outside_image_folder to allow it)",
            )
        return path

    def _source(self, relative: str, sample_id: str, rng: random.Random) -> ImageSource:
        """What the processor reads for an image: its file, or with augmentation the augmented pixels."""
        path = self._image_path(relative, sample_id)
        if not self.augment.enabled:
            return path
        try:
            image = load_image(path, self.preset.slicing.max_image_pixels)
        except ImageLoadError as exc:
            raise BadSampleError(sample_id, _image_reason(relative, exc)) from None
        return augment_image(image, self.augment, rng)

    def build(self, index: int) -> dict[str, Any]:
        """The sample for record ``index``; raises :class:`BadSampleError` for a bad record."""
        conversation = self._conversation(index)
        sid = conversation.id
        rng = random.Random(self.seed * _EPOCH_MIX * _INDEX_MIX + self.epoch * _INDEX_MIX + index)
        sources = [self._source(path, sid, rng) for path in conversation.images]
        try:
            prepared = self.processor.prepare(
                conversation.turns, sources, self.template, overview_only=self.overview_only
            )
        except MalformedConversationError as exc:
            raise BadSampleError(sid, f"malformed turns: {exc}") from None
        except PlaceholderMismatchError as exc:  # a template that renders fewer placeholders than it got
            raise BadSampleError(sid, f"image-count mismatch: {exc}") from None
        except _IMAGE_ERRORS as exc:
            raise BadSampleError(sid, self._image_failure(conversation, sources, exc)) from None
        encoded = truncate(prepared.text, self.max_length, sid)
        images = prepared.images
        return {
            "id": sid,
            "input_ids": torch.tensor(encoded.input_ids, dtype=torch.long),
            "labels": torch.tensor(encoded.labels, dtype=torch.long),
            "pixel_values": images.pixel_values,
            "piece_grids": images.piece_grids,
            "pieces_per_image": images.pieces_per_image,
            "num_text_tokens": encoded.num_text_tokens,
            "num_visual_tokens": encoded.num_visual_tokens,
        }

    def _image_failure(
        self, conversation: Conversation, sources: Sequence[ImageSource], error: Exception
    ) -> str:
        """The skip reason for an image error of a record: which image, found by preparing each alone
        (on this failure path only); an error no single image causes (a shared budget) names them all."""
        if len(sources) > 1:
            for relative, source in zip(conversation.images, sources, strict=True):
                try:
                    self.processor.load_and_plan([source], overview_only=self.overview_only)
                except _IMAGE_ERRORS as exc:
                    return _image_reason(relative, exc)
            return f"images {list(conversation.images)}: {error}"
        return _image_reason(conversation.images[0], error)

    def _conversation(self, index: int) -> Conversation:
        if index in self._unreadable:
            raise BadSampleError(record_id(None, index), self._unreadable[index])
        return parse_record(self.records[index], index)

    def lengths(self) -> list[int]:
        """Each record's total length (text + visual tokens, capped at ``max_length``) for the sampler.

        Exact for unaugmented data: the text is tokenized and each image's plan made from its file header
        (no pixel decoding). A record that fails these checks gets length 0 (it will be skipped or
        raise when read). Computed once (with :meth:`usable_indices`) and cached.
        """
        return [0 if isinstance(result, BadSampleError) else result for result in self._check_all()]

    def usable_indices(self, report: bool = True) -> list[int]:
        """The indices of the records that pass the checks :meth:`lengths` makes, in order.

        What an epoch draws from under ``"skip"``: every record is checked once, up front, from its text
        and image headers (no pixels decoded), so a bad record is never drawn, and the result is the same
        on every rank. With ``report``, each bad record goes to the skip log once (give it on one rank).
        """
        checked = self._check_all()
        bad = [(r.sample_id, i, r.reason) for i, r in enumerate(checked) if isinstance(r, BadSampleError)]
        if report:
            self.skips.record_all(bad)
        return [i for i, result in enumerate(checked) if not isinstance(result, BadSampleError)]

    def _check_all(self) -> list[int | BadSampleError]:
        if self._checked is None:
            self._checked = [self._check(i) for i in range(len(self))]
        return self._checked

    def _check(self, index: int) -> int | BadSampleError:
        """Record ``index``'s length, or the BadSampleError that reading it would raise, from headers only."""
        limit = self.preset.slicing.max_image_pixels
        try:
            conversation = self._conversation(index)
            sid = conversation.id
            sizes = []
            for path in conversation.images:
                try:  # header only
                    sizes.append(probe_image_size(self._image_path(path, sid), max_pixels=limit))
                except ImageLoadError as exc:
                    raise BadSampleError(sid, _image_reason(path, exc)) from None
            try:
                plans = self.processor.plan_images(sizes, overview_only=self.overview_only)
            except _IMAGE_ERRORS as exc:
                raise BadSampleError(sid, self._plan_failure(conversation, sizes, exc)) from None
            try:
                encoded = self.processor.encode_conversation(conversation.turns, plans, self.template)
            except MalformedConversationError as exc:
                raise BadSampleError(sid, f"malformed turns: {exc}") from None
            except PlaceholderMismatchError as exc:
                raise BadSampleError(sid, f"image-count mismatch: {exc}") from None
            truncate(encoded, self.max_length, sid)  # a visual block past max_length is a bad record
            return min(len(encoded.input_ids), self.max_length)
        except BadSampleError as exc:
            return exc

    def _plan_failure(
        self, conversation: Conversation, sizes: Sequence[tuple[int, int]], error: Exception
    ) -> str:
        """The reason a record's images cannot be planned: which image, found by planning each alone."""
        if len(sizes) > 1:
            for relative, size in zip(conversation.images, sizes, strict=True):
                try:
                    self.processor.plan_images([size], overview_only=self.overview_only)
                except _IMAGE_ERRORS as exc:
                    return _image_reason(relative, exc)
            return f"images {list(conversation.images)}: {error}"
        return _image_reason(conversation.images[0], error)


def _image_reason(relative: str, error: Exception) -> str:
    if isinstance(error, ImageLoadError):
        return f"image {relative!r} cannot be loaded: {error}"
    return f"image {relative!r}: {error}"
