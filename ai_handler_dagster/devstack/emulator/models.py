"""The emulator's demo models: real (if tiny) work done offline.

* ``demo/pixel-sketch`` renders PNG images with Pillow: shapes and colours derived from a hash
  of prompt, seed and size, with the prompt written on the picture. Same inputs, same bytes.
* ``demo/haiku-text`` writes a haiku (a list of text chunks, like a language model's stream)
  derived from a hash of the prompt.
* ``test/bad-output`` is a test model: it succeeds with an output that misbehaves on purpose
  (a URL on a foreign host or a private address, a redirect to cloud metadata, an oversized or
  mislabelled file, an output that expires at once), chosen by its ``misbehave`` input. No
  shipped price table prices it, so only tests that bring their own table can run it.

Each model describes its inputs once (:class:`InputField`); the same description produces the
OpenAPI schema served by the versions endpoint and validates create requests, so the two cannot
drift apart.
"""

from __future__ import annotations

import functools
import hashlib
import io
import random
import re
import textwrap
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from PIL import Image, ImageDraw, ImageFont

COG_VERSION = "0.9.6"
VERSION_CREATED_AT = "2025-01-01T00:00:00.000000Z"


@dataclass(frozen=True)
class InputField:
    """One model input, described the way Cog publishes it in the OpenAPI schema."""

    name: str
    type: Literal["string", "integer"]
    description: str
    required: bool = False
    default: Any = None
    minimum: int | None = None
    maximum: int | None = None
    min_length: int | None = None
    max_length: int | None = None

    def schema(self, order: int) -> dict[str, Any]:
        """The field's JSON schema property, as Cog writes it."""
        prop: dict[str, Any] = {
            "type": self.type,
            "title": self.name.replace("_", " ").title(),
            "description": self.description,
            "x-order": order,
        }
        if self.default is not None:
            prop["default"] = self.default
        for key, value in (
            ("minimum", self.minimum),
            ("maximum", self.maximum),
            ("minLength", self.min_length),
            ("maxLength", self.max_length),
        ):
            if value is not None:
                prop[key] = value
        return prop


@dataclass(frozen=True)
class OutputFile:
    """One output file a prediction serves under ``/files/{id}/{index}.{ext}``.

    The last three fields are for test models only: ``url`` lists that URL in the output
    instead of the emulator's own (and the emulator serves nothing for it), ``redirect``
    answers the file's URL with a 302 to that location, and ``gone`` answers it with 404.
    """

    data: bytes
    ext: str
    content_type: str
    url: str | None = None
    redirect: str | None = None
    gone: bool = False


@dataclass
class ModelResult:
    """What one run of a model produced: files (served by URL) or a list of text chunks."""

    files: list[OutputFile] = field(default_factory=list)
    chunks: list[str] | None = None
    metrics: dict[str, Any] = field(default_factory=dict)
    #: Delete the outputs right after success (``data_removed``), as the ``remove_output`` fault.
    remove_outputs: bool = False
    #: Test models only: answer exactly this ``output`` (``None`` included) instead of the files
    #: or chunks, when ``raw_output`` is set.
    raw_output: bool = False
    output: Any = None


class DemoModel:
    """A model the emulator can run: its identity, input contract and implementation."""

    owner: str = ""
    name: str = ""
    description: str = ""
    inputs: tuple[InputField, ...] = ()
    output_schema: dict[str, Any] = {}

    @property
    def ref(self) -> str:
        """``owner/name``."""
        return f"{self.owner}/{self.name}"

    @functools.cached_property
    def version_id(self) -> str:
        """A stable 64-hex version id, derived from the model's name and input contract."""
        contract = repr([(f.name, f.type, f.minimum, f.maximum) for f in self.inputs])
        return hashlib.sha256(f"{self.ref}:{contract}".encode()).hexdigest()

    def openapi_schema(self) -> dict[str, Any]:
        """An OpenAPI document in Cog's shape (``components.schemas.Input`` / ``Output``)."""
        return {
            "openapi": "3.0.2",
            "info": {"title": "Cog", "version": "0.1.0"},
            "paths": {},
            "components": {
                "schemas": {
                    "Input": {
                        "type": "object",
                        "title": "Input",
                        "required": [f.name for f in self.inputs if f.required],
                        "properties": {f.name: f.schema(i) for i, f in enumerate(self.inputs)},
                    },
                    "Output": {"title": "Output", **self.output_schema},
                }
            },
        }

    def version_json(self) -> dict[str, Any]:
        """The version object of ``GET /v1/models/{owner}/{name}/versions/{id}``."""
        return {
            "id": self.version_id,
            "created_at": VERSION_CREATED_AT,
            "cog_version": COG_VERSION,
            "openapi_schema": self.openapi_schema(),
        }

    def validate(self, raw: Any) -> tuple[dict[str, Any], list[dict[str, str]]]:
        """Check ``raw`` against the inputs.

        Returns the inputs with defaults filled in, and the ``invalid_fields`` list of a 422
        (empty when valid). Unknown fields are ignored, as Replicate does.
        """
        if not isinstance(raw, Mapping):
            return {}, [_invalid("invalid_type", "input", _type_message("object", raw))]
        resolved: dict[str, Any] = {}
        problems: list[dict[str, str]] = []
        for spec in self.inputs:
            value = raw.get(spec.name)
            if value is None:
                if spec.name in raw and spec.required:
                    problems.append(
                        _invalid(
                            "invalid_type", f"input.{spec.name}", _type_message(spec.type, None)
                        )
                    )
                elif spec.required:
                    problems.append(_invalid("required", "input", f"{spec.name} is required"))
                else:
                    resolved[spec.name] = spec.default
                continue
            problem = _check_value(spec, value)
            if problem:
                problems.append(problem)
            else:
                resolved[spec.name] = int(value) if spec.type == "integer" else value
        return resolved, problems

    def preview(self, inputs: Mapping[str, Any], seed: int) -> list[str] | None:
        """Text chunks known before the run ends (streamed while processing), if any."""
        return None

    def run(self, inputs: Mapping[str, Any], seed: int) -> ModelResult:
        """Do the work. Called once per prediction, off the request threads."""
        raise NotImplementedError


def _invalid(kind: str, field_name: str, description: str) -> dict[str, str]:
    return {"type": kind, "field": field_name, "description": description}


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    return "object"


def _type_message(expected: str, value: Any) -> str:
    return f"Invalid type. Expected: {expected}, given: {_json_type(value)}"


def _check_value(spec: InputField, value: Any) -> dict[str, str] | None:
    where = f"input.{spec.name}"
    if spec.type == "integer":
        # JSON Schema counts 256.0 as an integer; booleans are not numbers.
        is_int = isinstance(value, int) and not isinstance(value, bool)
        if not is_int and not (isinstance(value, float) and value.is_integer()):
            return _invalid("invalid_type", where, _type_message("integer", value))
        if spec.minimum is not None and value < spec.minimum:
            return _invalid("number_gte", where, f"Must be greater than or equal to {spec.minimum}")
        if spec.maximum is not None and value > spec.maximum:
            return _invalid("number_lte", where, f"Must be less than or equal to {spec.maximum}")
        return None
    if not isinstance(value, str):
        return _invalid("invalid_type", where, _type_message("string", value))
    if spec.min_length is not None and len(value) < spec.min_length:
        return _invalid(
            "string_gte", where, f"String length must be greater than or equal to {spec.min_length}"
        )
    if spec.max_length is not None and len(value) > spec.max_length:
        return _invalid(
            "string_lte", where, f"String length must be less than or equal to {spec.max_length}"
        )
    return None


def _rng(*parts: Any) -> random.Random:
    """A random stream determined only by ``parts`` (never by process state)."""
    digest = hashlib.sha256("\x1f".join(str(p) for p in parts).encode()).digest()
    return random.Random(int.from_bytes(digest, "big"))


@functools.lru_cache(maxsize=16)
def _font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    return ImageFont.load_default(size=size)


def render_sketch(prompt: str, seed: int, width: int, height: int) -> bytes:
    """Render the PNG for one image: a deterministic function of its four arguments."""
    rng = _rng("pixel-sketch", prompt, seed, width, height)

    def colour(lo: int = 0, hi: int = 255) -> tuple[int, int, int]:
        return (rng.randint(lo, hi), rng.randint(lo, hi), rng.randint(lo, hi))

    image = Image.new("RGB", (width, height), colour(20, 235))
    draw = ImageDraw.Draw(image)
    for _ in range(rng.randint(5, 12)):
        x0, y0 = rng.randrange(width), rng.randrange(height)
        x1 = min(width, x0 + rng.randint(width // 8, width // 2))
        y1 = min(height, y0 + rng.randint(height // 8, height // 2))
        shape = rng.choice(("ellipse", "rectangle", "triangle", "line"))
        fill = colour()
        if shape == "ellipse":
            draw.ellipse((x0, y0, x1, y1), fill=fill)
        elif shape == "rectangle":
            draw.rectangle((x0, y0, x1, y1), fill=fill)
        elif shape == "triangle":
            draw.polygon([(x0, y1), ((x0 + x1) // 2, y0), (x1, y1)], fill=fill)
        else:
            draw.line((x0, y0, x1, y1), fill=fill, width=max(1, width // 64))

    # The prompt on a banner at the bottom, so a person looking at an output can tell which
    # request made it.
    font_size = max(8, min(width, height) // 18)
    font = _font(font_size)
    lines = textwrap.wrap(prompt, max(8, int(width / (font_size * 0.6))))[:3] or [""]
    line_h = int(font_size * 1.25)
    banner_h = min(height, line_h * len(lines) + 6)
    draw.rectangle((0, height - banner_h, width, height), fill=(0, 0, 0))
    for i, line in enumerate(lines):
        draw.text((4, height - banner_h + 3 + i * line_h), line, fill=(255, 255, 255), font=font)

    out = io.BytesIO()
    image.save(out, format="PNG", compress_level=1)
    return out.getvalue()


class PixelSketch(DemoModel):
    """``demo/pixel-sketch``: prompt in, PNG images out (a list of file URLs)."""

    owner = "demo"
    name = "pixel-sketch"
    description = "Sketches a small PNG from a prompt; deterministic for a given seed."
    inputs = (
        InputField(
            "prompt", "string", "What to draw", required=True, min_length=1, max_length=2000
        ),
        InputField("width", "integer", "Width in pixels", default=256, minimum=64, maximum=1024),
        InputField("height", "integer", "Height in pixels", default=256, minimum=64, maximum=1024),
        InputField("seed", "integer", "Random seed; leave blank to randomize"),
        InputField("num_outputs", "integer", "Number of images", default=1, minimum=1, maximum=4),
    )
    output_schema = {"type": "array", "items": {"type": "string", "format": "uri"}}

    def run(self, inputs: Mapping[str, Any], seed: int) -> ModelResult:
        files = [
            OutputFile(
                render_sketch(inputs["prompt"], seed + i, inputs["width"], inputs["height"]),
                "png",
                "image/png",
            )
            for i in range(inputs["num_outputs"])
        ]
        return ModelResult(files=files, metrics={"image_count": len(files)})


_ADJECTIVES = (
    "silent", "amber", "quiet", "distant", "frozen", "golden", "hollow", "gentle", "restless",
    "pale", "crimson", "misty", "ancient", "falling", "endless", "small",
)  # fmt: skip
_NOUNS = (
    "river", "lantern", "mountain", "harbor", "sparrow", "orchard", "moon", "kettle", "meadow",
    "station", "willow", "ember", "tide", "garden", "signal", "rain",
)  # fmt: skip
_VERBS = (
    "drifts", "waits", "hums", "settles", "wanders", "glows", "listens", "turns", "fades",
    "breathes", "returns", "sleeps",
)  # fmt: skip


class HaikuText(DemoModel):
    """``demo/haiku-text``: prompt in, a haiku out as a list of text chunks."""

    owner = "demo"
    name = "haiku-text"
    description = "Writes a haiku about the prompt, streamed as text chunks."
    inputs = (
        InputField(
            "prompt", "string", "Topic of the haiku", required=True, min_length=1, max_length=2000
        ),
        InputField(
            "max_tokens",
            "integer",
            "Maximum chunks to generate",
            default=64,
            minimum=1,
            maximum=512,
        ),
    )
    output_schema = {
        "type": "array",
        "items": {"type": "string"},
        "x-cog-array-type": "iterator",
        "x-cog-array-display": "concatenate",
    }

    def preview(self, inputs: Mapping[str, Any], seed: int) -> list[str] | None:
        return self._chunks(inputs)

    def run(self, inputs: Mapping[str, Any], seed: int) -> ModelResult:
        chunks = self._chunks(inputs)
        words = re.findall(r"\w+", inputs["prompt"])
        return ModelResult(
            chunks=chunks,
            metrics={"input_token_count": len(words), "output_token_count": len(chunks)},
        )

    @staticmethod
    def _chunks(inputs: Mapping[str, Any]) -> list[str]:
        prompt: str = inputs["prompt"]
        rng = _rng("haiku-text", prompt)
        topic = next(iter(re.findall(r"[A-Za-z]{3,}", prompt)), rng.choice(_NOUNS)).lower()
        lines = [
            [rng.choice(_ADJECTIVES), topic, rng.choice(_VERBS)],
            ["the", rng.choice(_ADJECTIVES), rng.choice(_NOUNS), rng.choice(_VERBS)],
            [rng.choice(_NOUNS), "and", rng.choice(_NOUNS)],
        ]
        chunks: list[str] = []
        for n, line in enumerate(lines):
            for i, word in enumerate(line):
                last = i == len(line) - 1
                chunks.append(
                    word + ("" if last and n == len(lines) - 1 else "\n" if last else " ")
                )
        return chunks[: inputs["max_tokens"]]


#: Where misbehaving outputs point: cloud metadata, a private network, a host nobody allowed.
METADATA_URL = "http://169.254.169.254/latest/meta-data/iam/security-credentials/"
PRIVATE_URL = "http://10.0.0.7/internal/output.png"
FOREIGN_URL = "https://outputs.attacker.example/output.png"


class BadOutput(DemoModel):
    """``test/bad-output``: a test model that succeeds with an output that misbehaves.

    ``misbehave`` picks the misbehaviour (see ``MISBEHAVIOURS``); the prediction itself always
    succeeds, so whatever refuses the output must be the client's download rules.
    """

    owner = "test"
    name = "bad-output"
    description = "Test model: succeeds with a deliberately bad output (see the misbehave input)."
    MISBEHAVIOURS = (
        "foreign-host",  # a URL on a host that is not the provider's
        "private-address",  # a URL on a private (RFC 1918) address
        "metadata-address",  # a URL on the link-local cloud metadata address
        "redirect-to-metadata",  # an emulator file URL that redirects to cloud metadata
        "redirect-to-private",  # an emulator file URL that redirects to a private address
        "oversized",  # a PNG of size_bytes bytes
        "wrong-content-type",  # PNG bytes served as image/jpeg
        "markup-as-image",  # HTML with a script served as image/png
        "expired",  # a good PNG, deleted right after success (data_removed)
        "gone",  # an emulator file URL that answers 404
        "negative-predict-time",  # a good PNG, with metrics.predict_time of -1 s
        "empty-null",  # succeeds with output null
        "empty-string",  # succeeds with output ""
        "empty-list",  # succeeds with output []
        "empty-chunk",  # succeeds with output [""] (a text stream with nothing in it)
    )
    #: The output each empty-output misbehaviour answers with.
    EMPTY_OUTPUTS: dict[str, Any] = {
        "empty-null": None,
        "empty-string": "",
        "empty-list": [],
        "empty-chunk": [""],
    }
    inputs = (
        InputField("prompt", "string", "Any text", required=True, min_length=1, max_length=2000),
        InputField(
            "misbehave",
            "string",
            "How the output misbehaves: " + ", ".join(MISBEHAVIOURS),
            default="foreign-host",
        ),
        InputField(
            "size_bytes",
            "integer",
            "Size of the 'oversized' output in bytes",
            default=2 * 1024 * 1024,
            minimum=1,
            maximum=64 * 1024 * 1024,
        ),
    )
    output_schema = {"type": "array", "items": {"type": "string", "format": "uri"}}

    def validate(self, raw: Any) -> tuple[dict[str, Any], list[dict[str, str]]]:
        inputs, problems = super().validate(raw)
        choice = inputs.get("misbehave")
        if not problems and choice not in self.MISBEHAVIOURS:
            problems.append(
                _invalid(
                    "enum",
                    "input.misbehave",
                    "Must be one of: " + ", ".join(self.MISBEHAVIOURS),
                )
            )
        return inputs, problems

    def run(self, inputs: Mapping[str, Any], seed: int) -> ModelResult:
        choice = inputs["misbehave"]
        png = render_sketch(inputs["prompt"], seed, 64, 64)
        file = OutputFile(png, "png", "image/png")
        result = ModelResult(metrics={"misbehave": choice})
        if choice == "foreign-host":
            file = OutputFile(b"", "png", "image/png", url=FOREIGN_URL)
        elif choice == "private-address":
            file = OutputFile(b"", "png", "image/png", url=PRIVATE_URL)
        elif choice == "metadata-address":
            file = OutputFile(b"", "png", "image/png", url=METADATA_URL)
        elif choice == "redirect-to-metadata":
            file = OutputFile(b"", "png", "image/png", redirect=METADATA_URL)
        elif choice == "redirect-to-private":
            file = OutputFile(b"", "png", "image/png", redirect=PRIVATE_URL)
        elif choice == "oversized":
            body = png[:8] + bytes(max(0, inputs["size_bytes"] - 8))
            file = OutputFile(body, "png", "image/png")
        elif choice == "wrong-content-type":
            file = OutputFile(png, "png", "image/jpeg")
        elif choice == "markup-as-image":
            markup = b"<!doctype html><html><script>alert(document.cookie)</script></html>"
            file = OutputFile(markup, "png", "image/png")
        elif choice == "expired":
            result.remove_outputs = True
        elif choice == "gone":
            file = OutputFile(b"", "png", "image/png", gone=True)
        elif choice == "negative-predict-time":
            result.metrics["predict_time"] = -1.0
        elif choice in self.EMPTY_OUTPUTS:
            result.raw_output, result.output = True, self.EMPTY_OUTPUTS[choice]
            return result
        result.files = [file]
        return result


MODELS: dict[str, DemoModel] = {m.ref: m for m in (PixelSketch(), HaikuText(), BadOutput())}
"""Every model the emulator serves, by ``owner/name``."""

VERSIONS: dict[str, DemoModel] = {m.version_id: m for m in MODELS.values()}
"""The same models, by version id."""
