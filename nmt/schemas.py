"""The JSON contract of nmt serve: pydantic models of its requests and answers, for FastAPI to
check and to describe in /openapi.json, and the conversion of results and errors into them."""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, create_model

from nmt.results import Translation

if TYPE_CHECKING:
    from nmt.serve import ServeSettings
    from nmt.translate import Translator

ONE_LINE = r"^[^\n\r\x00]*$"  # a sentence is a line of `nmt translate` input


def _integral(value: Any) -> Any:
    """JSON's 2.0 is an integer (JSON Schema says so), which strict pydantic would refuse."""
    return int(value) if isinstance(value, float) and value.is_integer() else value



class TranslateRequest(BaseModel):
    """The fields and their types; request_model() adds the server's bounds."""

    model_config = ConfigDict(extra="forbid", strict=True)  # "3" is not a beam, 1 not true
    sentences: list[str]
    model: str | None = None
    beam: int | None = None
    nbest: int = 1
    attention: bool = False


def request_model(settings: ServeSettings) -> type[TranslateRequest]:
    sentence = Annotated[str, Field(max_length=settings.max_chars, pattern=ONE_LINE)]
    beam_size = Annotated[int, Field(ge=1, le=settings.max_beam), BeforeValidator(_integral)]
    return create_model(
        "TranslateRequest", __base__=TranslateRequest,
        sentences=(list[sentence], Field(min_length=1, max_length=settings.max_sentences,
                                         description="source sentences, one line each")),
        model=(str | None, Field(None, max_length=200,
                                 description="a model's name (GET /models); null: the default")),
        beam=(beam_size | None, Field(None, description="beam size; null: the model's decode.beam_size")),
        nbest=(beam_size, Field(1, description="hypotheses per sentence, best first (at most the beam)")),
        attention=(bool, Field(False, description="give each hypothesis its word attention")),
    )


class WordAttentionOut(BaseModel):
    source_words: list[str]
    target_words: list[str]
    weights: list[list[float]] = Field(description="target words x source words; rows sum to 1")


class HypothesisOut(BaseModel):
    translation: str
    score: float = Field(description="log-probability normalised for length: the ranking score")
    log_prob: float
    attention: WordAttentionOut | None


class TranslationOut(BaseModel):
    source: str
    translation: str = Field(description="the best hypothesis' translation")
    hypotheses: list[HypothesisOut] = Field(description="nbest hypotheses, best first (an empty "
                                                        "sentence has one, empty)")


class TranslateResponse(BaseModel):
    model: str
    beam: int
    translations: list[TranslationOut]


class HealthResponse(BaseModel):
    status: Literal["ok"]
    models: list[str]
    sentences: int = Field(description="sentences translated since the server started")
    rounds: int = Field(description="rounds of decoding since then: greedy batches and beam-search steps")
    mean_batch: float = Field(description="the mean number of sentences a round decoded together")


class ModelInfo(BaseModel):
    name: str
    checkpoint: str = Field(description="the checkpoint's file name (comma-separated for an ensemble)")
    step: int | None
    src_lang: str
    tgt_lang: str
    beam_size: int
    attention: str = Field(description="bahdanau | luong-dot | luong-general | none (an ensemble's "
                                       "kinds joined by +)")
    ensemble_size: int


class ModelsResponse(BaseModel):
    default: str
    models: list[ModelInfo]


class ErrorResponse(BaseModel):
    detail: str


ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorResponse, "description": text} for code, text in (
        (400, "malformed JSON or invalid UTF-8"), (401, "no or a wrong API key"),
        (404, "unknown model"), (413, "body, sentence count or a sentence over the limits"),
        (422, "a field of the wrong type or out of range"), (500, "decoding failed"),
        (503, "the server is shutting down"))}


def translation_out(translation: Translation) -> dict[str, Any]:
    hypotheses = [{"translation": c.text, "score": c.score, "log_prob": c.log_prob,
                   "attention": dataclasses.asdict(c.attention) if c.attention is not None else None}
                  for c in translation.hypotheses]
    return {"source": translation.source, "translation": translation.text, "hypotheses": hypotheses}


def model_info(name: str, translator: Translator) -> dict[str, Any]:
    members = getattr(translator.model, "members", [translator.model])
    kinds = list(dict.fromkeys(member.cfg.attention for member in members))
    return {"name": name, "checkpoint": ", ".join(path.name for path in translator.paths),
            "step": translator.step, "src_lang": translator.config.data.src_lang,
            "tgt_lang": translator.config.data.tgt_lang, "beam_size": translator.decode.beam_size,
            "attention": "+".join(kinds), "ensemble_size": len(translator.paths)}


def one_line(text: str) -> str:
    return " ".join(str(text).split())[:500]


def validation_error(errors: list[dict[str, Any]]) -> tuple[int, str]:
    """FastAPI's list of errors → a status and one line naming the field, e.g.
    `sentences.3: String should have at most 1000 characters`. Too many sentences, or a sentence
    too long, is 413 (and named first); malformed JSON 400; anything else 422."""
    too_large = [e for e in errors if e.get("type") in ("too_long", "string_too_long")
                 and tuple(e.get("loc", ()))[1:2] == ("sentences",)]
    first = (too_large or errors)[0]
    loc = [str(part) for part in first.get("loc", ()) if part != "body"]
    if first.get("type") == "json_invalid":
        where = f" at byte {loc[0]}" if loc else ""
        return 400, f"malformed JSON: {first.get('ctx', {}).get('error', 'cannot decode')}{where}"
    message = first.get("msg", "invalid")
    if first.get("type") == "string_pattern_mismatch":
        message = "a sentence is one line: no line breaks or NUL characters"
    more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
    return (413 if too_large else 422), one_line(f"{'.'.join(loc) or 'body'}: {message}{more}")
