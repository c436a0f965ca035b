"""The VLM stages (tag, caption, describe) on vLLM through ``ray.data.llm``: ``vlm.engine: vllm``.

Optional. The default engine is ``transformers`` (``vlm.py``: batched ``generate`` inside the pools'
actors). With ``engine: vllm`` each pool made only of VLM stages becomes one ``ray.data.llm``
processor: vLLM engine replicas with continuous batching, fed by Ray Data's CPU stages.

Install, on the GPU machines only (it is not part of the CPU development environment)::

    pip install 'richlayout[vllm]'    # ray[llm]: the vLLM release this Ray version is tested with

vLLM pins its own CUDA build of torch, so install it into the GPU image or a fresh environment, not
into a CPU venv. Without it, a config with ``engine: vllm`` is refused when it is loaded (``run`` and
``plan`` alike) with a message saying so.

Configure (``configs/datagen/real_vllm.yaml`` is the real preset with these settings)::

    vlm:
      engine: vllm
      vllm:
        tensor_parallel_size: 1        # GPUs per engine replica
        gpu_memory_utilization: 0.9
        max_model_len: 8192            # prompt (image tokens included) + answer
        max_num_seqs: null             # null: vLLM's GPU-dependent default
        batch_size: 32                 # requests per Ray Data batch sent to an engine
    pools:                             # VLM stages in pools of their own
      vlm: {stages: [tag, caption], num_gpus: 1, actors: 1, max_actors: 8}
      detect: {stages: [ground, segment], num_gpus: 0.5, actors: 1, max_actors: 8}
      describe: {stages: [describe], num_gpus: 1, actors: 1, max_actors: 16}
      score: {stages: [score, filter], num_gpus: 0.25, actors: 1, max_actors: 4}

A VLM pool's ``actors`` .. ``max_actors`` is its number of engine replicas (Ray autoscales between
them); its ``num_gpus`` must equal ``tensor_parallel_size`` (times ``engine_kwargs.pipeline_parallel_size``
when set: vLLM takes whole GPUs), so ``plan`` counts the GPUs right; its ``num_cpus`` is unused
(``vlm.vllm.cpu_stage_cpus`` sizes the CPU-side workers). The model is the stages' ``model`` (hub id or local folder, its ``revision`` and
``dtype``), or ``vlm.vllm.model_source`` (e.g. an ``s3://`` copy) when set: any chat VLM that vLLM
runs natively (Qwen2.5-VL, Qwen3-VL, ...; no remote code), its prompt rendered by the model's own chat
template as on the transformers engine. Every node must reach the
weights (HF cache, ``HF_HOME``; the ``HF_*`` variables are forwarded), and so must the driver: building
the processor reads the model's config and tokenizer there.

How a VLM pool runs (``pipeline.py`` holds the Ray calls, this module the plain functions)::

    chunk rows --explode_chunk--> per chunk: one request row per (image, stage) or per object crop,
                                  plus one carrier row holding the chunk itself
      --processor-->  preprocess (``preprocess``: one user turn, the image then the prompt; greedy)
                      -> PrepareMultimodal -> ChatTemplate -> Tokenize -> vLLM -> Detokenize
                      -> postprocess (``postprocess``: the transformers engine's answer parsing)
      --ChunkAssembler (one actor)--> chunk rows again, with the stages' columns

The carrier row carries no request: it is marked as an inference error (``CARRIER``), which every
``ray.data.llm`` stage and the postprocess pass through untouched. It holds the chunk's images, so
``execution.chunk_size`` sets how much data rides along each processor stage. Every field crosses with
one Arrow type whatever the batch (the request and the answer as JSON text, the carrier's chunk as bytes:
``chunks.encode_carrier`` in ``pipeline.py``): Ray Data types each batch apart. All rows of a pool
meet in one assembler actor (no shuffle, which would hold the whole dataset back as a barrier); it
only regroups and parses answers, far below a vLLM engine's rate. The processor runs with
``should_continue_on_error``: a request that fails (an image too large for ``max_model_len``, ...)
fails only its image row, recorded like a transformers-engine failure (status ``failed``,
``error_stage`` the stage, ``error`` "Type: message"); when every ok row of a chunk fails in a stage
for one exception type, the run stops (``StageError``), as the transformers engine does for a batch.

Same output columns, prompts, pixels (``max_pixels``, the describe crops) and answer parsing as the
transformers engine. Not the same: vLLM batches requests across chunks as they arrive, so an answer
can change in its last bits with what shared its batch: a resumed run is not byte-identical to an
uninterrupted one, as it is with the transformers engine. The summary's busy table has no row for
the vLLM stages (their time is Ray Data's: see the Ray dashboard's Data view).

Tested without vLLM or a GPU (``tests/test_datagen_vllm.py``): the functions here on plain dicts, and
a whole run through the real ray.data.llm processors of this Ray version with a stand-in ``vllm``
module; the real vLLM engine itself is exercised only on a GPU machine.
"""

from __future__ import annotations

import importlib.util
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Annotated, Any

from pydantic import Field

from shards import STATUS_FAILED, STATUS_OK
from shards.config import Float, NonNegativeFloat, PositiveInt

from . import StageError, as_image, as_objects, error_text
from .caption import clean_caption
from .describe import clean_description, crops_to_describe
from .tag import tags_from_answer
from .vlm import to_pil

INSTALL_HINT = (
    "pip install 'richlayout[vllm]' on a machine with NVIDIA GPUs (CUDA); it installs ray[llm] with the "
    "vLLM release this Ray version is tested with, and vLLM's own torch build"
)
# The columns of the rows between explode_chunk and the ChunkAssembler.
REF = "vlm_ref"  # {"chunk": chunk key, "index": request index in the chunk (-1: the carrier), "count": requests}
REQUEST = "vlm_request"  # request rows: what to ask (see ``_request``; JSON text from preprocess on); None on the carrier
CHUNK = "vlm_chunk"  # the carrier: the chunk itself; None on request rows
VALUE = "vlm_value"  # after postprocess: the parsed answer, as JSON text
ERROR = "__inference_error__"  # ray.data.llm's per-row error column; non-empty rows skip every stage
CARRIER = "no request: the chunk's carrier row"  # the ERROR value that marks a carrier
FAILED = "vlm_failed"  # key of the carrier's chunk: [row, stage, error] of rows whose request failed to build
CHAT_FORMATS = ("openai", "string")


def vllm_available() -> bool:
    """Whether vLLM can be imported here (not imported: that would initialise CUDA)."""
    return importlib.util.find_spec("vllm") is not None


def uses_vlm(name: str, stage_config: Any) -> bool:
    """Whether stage ``name`` asks the VLM (tag only with its "vlm" method)."""
    return name in ("caption", "describe") or (name == "tag" and getattr(stage_config, "method", None) == "vlm")


@dataclass(frozen=True)
class VllmConfig:
    """The vLLM engine of the VLM pools (``vlm.engine: vllm``)."""

    model_source: str | None = None  # None: the stages' model name; or another copy (local folder, s3://...)
    tensor_parallel_size: PositiveInt = 1  # GPUs per engine replica (x engine_kwargs' pipeline_parallel_size, if set);
    #                                a VLM pool's num_gpus must equal it
    gpu_memory_utilization: Annotated[Float, Field(gt=0, le=1)] = 0.9  # fraction of each GPU vLLM may use (weights + KV cache)
    max_model_len: PositiveInt = 8192  # tokens per request: prompt, image tokens included, plus answer
    max_num_seqs: PositiveInt | None = None  # requests an engine runs at once; None: vLLM's default for the GPU
    batch_size: PositiveInt = 32  # requests per Ray Data batch sent to an engine
    max_concurrent_batches: PositiveInt = 8  # batches in flight per engine (keeps it fed between batches)
    accelerator_type: str | None = None  # e.g. "H100": engines only on nodes with that GPU type
    chat_template_content_format: str = "openai"  # "openai": the model's template renders the image part,
    #                                               as the transformers engine's does; "string": vLLM's
    cpu_stage_cpus: NonNegativeFloat = 1.0  # CPUs per CPU-side worker: request building, chat template, tokenize,
    #                              detokenize, answer parsing, chunk assembly
    engine_kwargs: dict[str, Any] = field(default_factory=dict)  # any other vLLM engine argument

    def __post_init__(self) -> None:
        if self.chat_template_content_format not in CHAT_FORMATS:
            raise ValueError(f"chat_template_content_format must be one of {CHAT_FORMATS}, "
                             f"got {self.chat_template_content_format!r}")
        pp = self.engine_kwargs.get("pipeline_parallel_size", 1)
        if not isinstance(pp, int) or isinstance(pp, bool) or pp < 1:
            raise ValueError(f"engine_kwargs.pipeline_parallel_size must be an integer >= 1, got {pp!r}")
        named = sorted(set(self.engine_kwargs) & _NAMED_ENGINE_KWARGS)
        if named:
            raise ValueError(f"engine_kwargs {named}: set them as fields of vlm.vllm (or the stages' model), "
                             "not in engine_kwargs")

    @property
    def gpus_per_replica(self) -> int:
        """GPUs one engine replica takes: tensor x pipeline parallel size."""
        return self.tensor_parallel_size * self.engine_kwargs.get("pipeline_parallel_size", 1)


_NAMED_ENGINE_KWARGS = {"model", "tensor_parallel_size", "gpu_memory_utilization", "max_model_len", "max_num_seqs",
                        "dtype", "revision", "task_type"}


# ---------------------------------------------------------------------------------------------------
# The processor: its config, and the preprocess / postprocess of each request row.


def processor_config(vllm: VllmConfig, model, pool) -> Any:
    """The ``vLLMEngineProcessorConfig`` of one VLM pool: ``model`` is its stages' ModelSpec, ``pool``
    its PoolConfig (engine replicas ``actors`` .. ``max_actors``)."""
    from ray.data.llm import (
        ChatTemplateStageConfig,
        DetokenizeStageConfig,
        PrepareMultimodalStageConfig,
        TokenizerStageConfig,
        vLLMEngineProcessorConfig,
    )

    engine_kwargs = {
        "tensor_parallel_size": vllm.tensor_parallel_size,
        "gpu_memory_utilization": vllm.gpu_memory_utilization,
        "max_model_len": vllm.max_model_len,
        "dtype": model.dtype,  # "auto": the checkpoint's (bfloat16 for Qwen2.5-VL and Qwen3-VL), as on CUDA with transformers
        "limit_mm_per_prompt": {"image": 1},
    }
    if vllm.max_num_seqs is not None:
        engine_kwargs["max_num_seqs"] = vllm.max_num_seqs
    if model.revision is not None and vllm.model_source is None:
        engine_kwargs["revision"] = model.revision
    engine_kwargs.update(vllm.engine_kwargs)
    cpu = {"num_cpus": vllm.cpu_stage_cpus}
    return vLLMEngineProcessorConfig(
        model_source=vllm.model_source or model.name,
        engine_kwargs=engine_kwargs,
        batch_size=vllm.batch_size,
        concurrency=(pool.actors, pool.max_actors or pool.actors),
        max_concurrent_batches=vllm.max_concurrent_batches,
        accelerator_type=vllm.accelerator_type,
        should_continue_on_error=True,  # a failed request fails its image row, not the run
        prepare_multimodal_stage=PrepareMultimodalStageConfig(
            enabled=True, chat_template_content_format=vllm.chat_template_content_format, **cpu),
        chat_template_stage=ChatTemplateStageConfig(enabled=True, **cpu),
        tokenize_stage=TokenizerStageConfig(enabled=True, **cpu),
        detokenize_stage=DetokenizeStageConfig(enabled=True, **cpu),
    )


def chat_messages(image, prompt: str) -> list[dict]:
    """One user turn, the image then the prompt (the transformers engine's turn), in the OpenAI
    format ``ray.data.llm`` reads (a PIL image as ``image_pil``)."""
    return [{"role": "user", "content": [{"type": "image_pil", "image_pil": image}, {"type": "text", "text": prompt}]}]


def sampling_params(max_tokens: int) -> dict:
    """Greedy decoding of at most ``max_tokens`` (the transformers engine's ``do_sample=False``);
    the Detokenize stage decodes, skipping special tokens."""
    return {"temperature": 0.0, "max_tokens": int(max_tokens), "detokenize": False}


def preprocess(row: dict) -> dict:
    """A request row -> the processor's input (chat messages, sampling params, the request as JSON
    text); marks a carrier row so that every stage passes it through."""
    request = row.get(REQUEST)
    if request is None:
        return {ERROR: CARRIER}
    return {
        "messages": chat_messages(request["image"], request["prompt"]),
        "sampling_params": sampling_params(request["max_tokens"]),
        # The pixels travel once, in messages. The rest travels as JSON text: as a dict, Arrow would type
        # it per batch (source_caption str in one batch, null in another; object null or int), and Ray
        # Data (2.60) fails to merge two such struct types with a batch holding the carrier, whose
        # chunk is stored as pickled objects ("Unable to merge: Field __data has incompatible types").
        REQUEST: json.dumps({k: v for k, v in request.items() if k != "image"}),
    }


def request_of(row: Mapping) -> dict:
    """A row's request as a dict (JSON text from ``preprocess`` on; a dict as ``explode_chunk`` made it)."""
    request = row[REQUEST]
    return json.loads(request) if isinstance(request, str) else dict(request)


def postprocess(row: dict, stages: Mapping[str, Any]) -> dict:
    """A generated row -> its parsed answer (the transformers engine's parsing, as JSON text: a list of
    tags in one row, a caption or None in another, one Arrow type), without the messages, images and
    tokens."""
    value = answer_value(request_of(row), row["generated_text"], stages)
    return {REF: row[REF], REQUEST: row[REQUEST], VALUE: json.dumps(value)}


def answer_value(request: Mapping, answer: str, stages: Mapping[str, Any]) -> Any:
    """A stage's value for one answer: tags (list), a caption (str or None), a description (str, or
    None to keep the phrase)."""
    name = request["stage"]
    if name == "tag":
        return tags_from_answer(answer, request.get("source_caption"), stages[name])
    if name == "caption":
        return clean_caption(answer)
    if name == "describe":
        return clean_description(answer)
    raise ValueError(f"stage {name!r} does not ask the VLM")


# ---------------------------------------------------------------------------------------------------
# Chunks -> request rows -> chunks.


def chunk_key(chunk: Mapping) -> str:
    """A chunk's identity within a run: its shard and first input."""
    return f"{chunk['shard']}:{chunk['start']}"


def _source_caption(cols: Mapping, i: int) -> str | None:
    value = cols["source_caption"][i] if "source_caption" in cols else None
    return value if isinstance(value, str) else None  # None / NaN: no caption


def _request(name: str, cfg: Any, cols: Mapping, i: int) -> list[dict]:
    """The requests of row ``i`` for stage ``name``: one per image (tag, caption), one per object
    crop big enough to describe (describe)."""
    base = {"stage": name, "row": i, "object": None, "prompt": cfg.prompt, "max_tokens": cfg.max_new_tokens,
            "source_caption": _source_caption(cols, i) if name == "tag" else None}
    if name == "describe":
        objects = as_objects(cols["objects"][i])
        image = as_image(cols["image"][i]) if objects else None
        return [{**base, "object": j, "image": to_pil(crop, cfg.max_pixels)}
                for j, crop in crops_to_describe(image, objects, cfg)]
    return [{**base, "image": to_pil(as_image(cols["image"][i]), cfg.max_pixels)}]


def explode_chunk(chunk: dict, stages: Mapping[str, Any]) -> list[dict]:
    """A chunk -> one row per request of its ok rows (``stages``: name -> config, the pool's VLM
    stages, which read nothing the others write), then the carrier row with the chunk.

    A row whose request cannot be built (a broken image, bad objects) gets no request: the carrier
    lists it, and the ChunkAssembler records it failed in that stage.
    """
    cols = chunk["columns"]
    ok = [i for i, s in enumerate(cols["status"]) if s == STATUS_OK]
    requests: list[dict] = []
    failed: dict[int, tuple[str, str]] = {}
    for name, cfg in stages.items():
        for i in ok:
            if i in failed:
                continue
            try:
                requests.extend(_request(name, cfg, cols, i))
            except Exception as e:  # noqa: BLE001 - recorded on the row, as run_rows does
                failed[i] = (name, error_text(e))
    key, n = chunk_key(chunk), len(requests)
    rows = [{REF: {"chunk": key, "index": k, "count": n}, REQUEST: r, CHUNK: None} for k, r in enumerate(requests)]
    carrier = {**chunk, FAILED: [[i, s, e] for i, (s, e) in sorted(failed.items())]}
    rows.append({REF: {"chunk": key, "index": -1, "count": n}, REQUEST: None, CHUNK: carrier})
    return rows


@dataclass
class _Pending:
    count: int
    chunk: dict | None = None
    answers: dict[int, tuple[Mapping, Any, str | None]] = field(default_factory=dict)


class ChunkAssembler:
    """Collects the rows of each chunk (the carrier and every answer, in any order, mixed with other
    chunks' rows) and hands the chunk back once all have arrived. One instance sees every row."""

    def __init__(self, stages: Mapping[str, Any]) -> None:
        self.stages = dict(stages)
        self.pending: dict[str, _Pending] = {}

    def add(self, row: Mapping) -> dict | None:
        """Take one processor output row; the completed chunk when this was its last row."""
        ref = row[REF]
        entry = self.pending.setdefault(ref["chunk"], _Pending(int(ref["count"])))
        error = row.get(ERROR)
        error = error if isinstance(error, str) and error else None  # "" / None / NaN: no error
        if int(ref["index"]) < 0:
            entry.chunk = row[CHUNK]
        else:
            value = None if error else row.get(VALUE)
            value = json.loads(value) if isinstance(value, str) else value
            entry.answers[int(ref["index"])] = (request_of(row), value, error)
        if entry.chunk is None or len(entry.answers) < entry.count:
            return None
        del self.pending[ref["chunk"]]
        return merge_answers(entry.chunk, self.stages, [entry.answers[k] for k in range(entry.count)])

    def add_all(self, rows: Iterable[Mapping]) -> list[dict]:
        """``add`` each row; the chunks completed."""
        return [c for c in (self.add(r) for r in rows) if c is not None]


def merge_answers(chunk: dict, stages: Mapping[str, Any], answers: list[tuple[Mapping, Any, str | None]]) -> dict:
    """The chunk with the stages' columns set from ``(request, value, error)`` of its requests.

    As the transformers engine leaves them: ``tags`` / ``caption`` / ``objects`` (descriptions; the
    phrase where an object was too small or the answer empty) on the rows still ok, the old value
    (None when new) elsewhere; a row whose request failed is ``failed`` in the first such stage.
    """
    chunk = dict(chunk)
    built = chunk.pop(FAILED, [])
    cols = dict(chunk["columns"])
    n = len(cols["key"])
    ok = [i for i in range(n) if cols["status"][i] == STATUS_OK]
    errors: dict[int, dict[str, str]] = {}  # row -> stage -> error
    for i, stage, error in built:
        errors.setdefault(int(i), {})[stage] = error
    values: dict[tuple[str, int], Any] = {}
    described: dict[int, dict[int, str]] = {}
    for request, value, error in answers:
        stage, i = request["stage"], int(request["row"])
        if error is not None:
            errors.setdefault(i, {}).setdefault(stage, error)
        elif stage == "describe":
            if value is not None:
                described.setdefault(i, {})[int(request["object"])] = str(value)
        elif stage == "tag":
            values[(stage, i)] = [str(t) for t in value]  # a list again, whatever container it travelled in
        else:
            values[(stage, i)] = value
    status, error_stage, error_col = list(cols["status"]), _column(cols, "error_stage", n), _column(cols, "error", n)
    alive = list(ok)
    for stage in stages:  # pipeline order: a row fails in its first failing stage
        failing = [i for i in alive if stage in errors.get(i, {})]
        kinds = {errors[i][stage].split(":")[0] for i in failing}
        if len(alive) > 1 and len(failing) == len(alive) and len(kinds) == 1:
            first = errors[alive[0]][stage]
            raise StageError(
                f"stage {stage!r} failed on all {len(alive)} ok rows of a chunk with {first} (first key "
                f"{cols['key'][alive[0]]!r}); this is a bug or a broken model/config, not bad data"
            )
        for i in failing:
            status[i], error_stage[i], error_col[i] = STATUS_FAILED, stage, errors[i][stage]
        alive = [i for i in alive if i not in set(failing)]
        name, new = _stage_column(stage, cols, alive, values, described)
        old = cols.get(name)
        cols[name] = [new[i] if i in new else (None if old is None else old[i]) for i in range(n)]
    cols.update(status=status, error_stage=error_stage, error=error_col)
    return {**chunk, "columns": cols}


def _column(cols: Mapping, name: str, n: int) -> list:
    return list(cols[name]) if name in cols else [None] * n


def _stage_column(stage: str, cols: Mapping, rows: list[int], values: Mapping, described: Mapping) -> tuple[str, dict]:
    """The column a stage writes and its value on each of ``rows`` (the rows it succeeded on)."""
    if stage == "describe":
        out = {}
        for i in rows:
            objects = as_objects(cols["objects"][i])
            for j, obj in enumerate(objects):
                obj["description"] = described.get(i, {}).get(j, obj["phrase"])
            out[i] = objects
        return "objects", out
    name = {"tag": "tags", "caption": "caption"}[stage]
    return name, {i: values.get((stage, i)) for i in rows}
