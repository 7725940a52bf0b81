"""Inference engines for deployment: PyTorch or OpenVINO, in fp32, bf16 or int8.

The one place that chooses how a model computes at deployment. Training and Grad-CAM stay in
PyTorch. A reduced precision is used only after it passed the quality gate (gate.py), and
then exactly: it computes every image and PyTorch fp32 computes again those in the band, where
its error could change a decision (``Runner.exact``, ``ensemble_band``), so that on the
verification images (a sample of the deploy's own and the labelled ones) no decision differs
from fp32's and the label figures hold where there are labels. The converted model and the verdict are cached
in the cache folder, keyed by the model file's hash, the engine's version, the precision and
the input size (the verdict also by the images checked and the gate's rule); a verdict records
the hashes of the converted files and a hash of itself, checked on every use, so an engine
changed or truncated after it was verified is converted and verified again (with a warning),
never run. OpenVINO is optional (``pip install "thumbclf[openvino]"``); nothing here imports it
unless it is asked for, and its telemetry (and NNCF's) is never loaded: nothing is written to
the home folder or sent anywhere.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
import shutil
import sys
import warnings
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from thumbclf.core.errors import ConfigError
from thumbclf.core.files import atomic_text, file_digest
from thumbclf.core.layout import CACHE_FOLDER
from thumbclf.nn.familiarity import Familiarity, WithFeatures
from thumbclf.predict import gate as quality
from thumbclf.predict.engine_cache import binding, cached_verdict, clear, sealed
from thumbclf.predict.quantise import INSTALL, quantise
from thumbclf.predict.verification import GATE, Check, Evidence

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------- the machine


@lru_cache(maxsize=1)
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags (Linux /proc/cpuinfo; empty where unknown)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def native(precision: str, device: torch.device) -> bool:
    """Whether this machine computes ``precision`` natively (else it is slower, not faster)."""
    if precision == "fp32":
        return True
    if device.type == "cuda":
        return precision == "bf16" and torch.cuda.is_bf16_supported()
    flags = cpu_flags()
    if precision == "bf16":
        return bool(flags & {"avx512_bf16", "amx_bf16"})
    if precision == "int8":
        return bool(flags & {"avx512_vnni", "avx_vnni", "amx_int8"})
    return False


def fp32_why(spec: EngineSpec) -> str:
    """'PyTorch fp32', and why where auto had nothing faster to try (no native bf16 here)."""
    if spec.precision != "auto" or native("bf16", spec.device):
        return "PyTorch fp32"
    return (f"PyTorch fp32 (this {'GPU' if spec.device.type == 'cuda' else 'CPU'} computes no "
            "bf16 natively, so no faster precision is tried)")


def no_telemetry() -> None:
    """Keep OpenVINO's and NNCF's telemetry from loading: both fall back to a stub when the
    ``openvino_telemetry`` package cannot be imported, and so write no client id to
    ~/intel and send nothing."""
    if "openvino_telemetry" not in sys.modules:
        sys.modules["openvino_telemetry"] = None  # type: ignore[assignment] - import fails
    else:  # imported by someone else first: decline consent, so it neither writes nor sends
        try:
            from openvino_telemetry.utils import opt_in_checker as checker

            checker.OptInChecker.check = lambda *a, **k: checker.ConsentCheckResult.DECLINED
        except (ImportError, AttributeError):
            pass


@lru_cache(maxsize=1)
def openvino_version() -> str | None:
    """OpenVINO's version, or None when it is not installed."""
    no_telemetry()
    try:
        import openvino
    except ImportError:
        return None
    return openvino.get_version()


# ---------------------------------------------------------------------------- runners


@dataclass
class Runner:
    """A model that turns normalised NCHW float batches into logits (a float32 CPU tensor).

    A verified reduced precision carries PyTorch fp32 beside it (``exact``), the differences
    the gate measured between them (``measured``: gate.discrepancy) and, in a deploy, the band
    shared by the ensemble's runners (``band``: gate.Band): the images in the band are
    computed again by ``exact`` (ensemble.ensemble_predict)."""

    engine: str
    precision: str
    forward: Callable[[torch.Tensor], torch.Tensor]
    exact: "Runner | None" = None
    measured: dict | None = None
    band: quality.Band | None = None
    folder: Path | None = None  # OpenVINO: the cache entry it was read from

    def recipe(self) -> dict | None:
        """What another process needs to compute as this runner does (rebuild): None for
        PyTorch fp32; a verified candidate's engine, precision, cache entry and band."""
        if self.exact is None:
            return None
        band = self.band
        return {"engine": self.engine, "precision": self.precision, "folder": self.folder,
                "measured": self.measured, "safety": band.safety if band else GATE["safety"],
                "threshold": band.threshold if band else None,
                "band": dict(band.measured) if band else {}}  # as widened here so far

    @property
    def name(self) -> str:
        return f"{self.engine} {self.precision}"

    @torch.inference_mode()
    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward(x).float().cpu()


def torch_runner(model: torch.nn.Module, device: torch.device, precision: str,
                 channels_last: bool) -> Runner:
    model = model.to(device).eval()
    if channels_last:
        model = model.to(memory_format=torch.channels_last)

    def forward(x: torch.Tensor) -> torch.Tensor:
        if precision == "bf16":
            with torch.autocast(device.type, dtype=torch.bfloat16):
                return model(x)
        return model(x)  # fp32: the reference arithmetic, on the CPU and on GPUs

    return Runner("torch", precision, forward)


def _ov_model(model: torch.nn.Module, size: int, cache: Path, calibration: Callable | None,
              precision: str, progress: bool = False):
    """The OpenVINO model (int8: quantised with NNCF on ``calibration()`` batches, its bars
    shown if ``progress``), cached."""
    no_telemetry()
    import openvino as ov

    xml = cache / "model.xml"
    if xml.is_file():
        try:
            return ov.Core().read_model(xml)
        except Exception as exc:  # noqa: BLE001 - truncated or damaged: convert it again
            log.warning("%s: the cached engine is unreadable (%s); converting it again", cache,
                        type(exc).__name__)
            shutil.rmtree(cache, ignore_errors=True)
    with warnings.catch_warnings():  # its tracer warns about torch.jit's future, not about us
        warnings.simplefilter("ignore")
        ov_model = ov.convert_model(model.cpu().eval(),
                                    example_input=torch.zeros(1, 3, size, size))
    if precision == "int8":
        ov_model = quantise(ov_model, calibration, progress=progress)
    tmp = cache.with_name(f".{cache.name}.{os.getpid()}.tmp")  # both files, then one rename
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    ov.save_model(ov_model, tmp / xml.name, compress_to_fp16=False)
    try:
        tmp.rename(cache)
    except OSError:  # another run cached it meanwhile: theirs is as good
        shutil.rmtree(tmp, ignore_errors=True)
    return ov_model


def openvino_runner(model: torch.nn.Module, size: int, precision: str, cache: Path,
                    calibration: Callable | None = None, *, progress: bool = False) -> Runner:
    no_telemetry()
    import openvino as ov

    ov_model = _ov_model(model, size, cache, calibration, precision, progress)
    hint = "bf16" if precision == "bf16" else "f32"  # int8 layers run int8 whatever the hint
    # LATENCY: one stream with every core. A synchronous call (as forward makes, one batch at a
    # time) runs on one stream, and THROUGHPUT splits the cores into streams: it ran at half
    # the speed (2 cores: 62 against 121 images/s on a batch of 64, bf16, measured)
    compiled = ov.Core().compile_model(ov_model, "CPU", {"INFERENCE_PRECISION_HINT": hint,
                                                         "PERFORMANCE_HINT": "LATENCY"})

    def forward(x: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(compiled(x.contiguous().numpy())[0])

    return Runner("openvino", precision, forward, folder=cache)


# ---------------------------------------------------------------------------- the gate


def describe_gate(verdict: dict) -> str:
    """The gate's verdict in one line (gate.describe)."""
    return quality.describe(verdict)


# ---------------------------------------------------------------------------- choosing


def candidates(engine: str, precision: str, device: torch.device) -> list[tuple[str, str]]:
    """(engine, precision) pairs to try, fastest first; the last one is always PyTorch-exact."""
    if device.type == "cuda":
        if engine == "openvino":
            raise ConfigError("engine: openvino runs on the CPU; with device cuda use engine: "
                              "torch or auto")
        if precision == "int8":
            raise ConfigError("precision: int8 is for CPUs (OpenVINO); on a GPU use auto, fp32 "
                              "or bf16")
        if precision == "bf16" and not native("bf16", device):
            raise ConfigError("precision: bf16 is not computed natively by this GPU; use auto "
                              "or fp32")
        bf16 = [("torch", "bf16")] if precision != "fp32" and native("bf16", device) else []
        return bf16 + ([("torch", "fp32")] if precision != "bf16" else [])
    engines = ["openvino", "torch"] if engine == "auto" else [engine]
    if "openvino" in engines and openvino_version() is None:
        if engine == "openvino":
            raise ConfigError(f"engine: openvino is not installed; {INSTALL}, or use engine: "
                              "auto or torch")
        engines.remove("openvino")
    # auto never quantises: int8 needs a calibration pass and, with NNCF's default settings,
    # failed the quality gate on trained models; ask for it with precision: int8
    precisions = ["bf16", "fp32"] if precision == "auto" else [precision]
    pairs = []
    for p in precisions:
        if precision != "auto" or native(p, device):
            for e in engines:
                if e == "torch" and p == "int8":
                    continue
                if (e, p) == ("openvino", "fp32") and engine == "auto":
                    continue  # measured no faster than PyTorch fp32 here: not worth converting
                pairs.append((e, p))
    if precision != "auto":
        for e, p in pairs:
            if not native(p, device):
                raise ConfigError(f"precision: {p} is not computed natively by this CPU (no "
                                  f"{'AVX-512 BF16 or AMX' if p == 'bf16' else 'VNNI or AMX'}), "
                                  "so it would be slower, not faster; use auto or fp32")
        if not pairs:
            raise ConfigError(f"precision: {precision} needs engine: openvino ({INSTALL})")
    if ("torch", "fp32") not in pairs and precision == "auto":
        pairs.append(("torch", "fp32"))
    return pairs


def cache_key(model_file: Path, engine: str, precision: str, size: int, verdict: str) -> str:
    """The converted model's key (file hash, engine version, precision, size, machine); with
    ``verdict`` (threshold, temperature, verification images) the key of a gate's verdict."""
    version = openvino_version() if engine == "openvino" else torch.__version__
    cpu = hashlib.sha1(" ".join(sorted(cpu_flags())).encode()).hexdigest()[:8]
    text = (f"{file_digest(model_file)}|{engine}|{version}|{precision}|{size}|{platform.machine()}|"
            f"{cpu}|{verdict}")
    return hashlib.sha1(text.encode()).hexdigest()[:16]


@dataclass(frozen=True)
class EngineSpec:
    """How a deploy may compute: the engine and precision keys, the cache folder of converted
    engines and verdicts, the device, and whether int8's quantisation shows its bars."""

    engine: str = "auto"
    precision: str = "auto"
    cache_dir: Path = Path(CACHE_FOLDER)
    device: torch.device = torch.device("cpu")
    progress: bool = False


@dataclass(frozen=True)
class ModelSpec:
    """What is verified: the runnable model, its file (the cache's key), input size and
    memory format, and what its decisions need (classes, temperature, the threshold in force,
    the unfamiliar-slide rule)."""

    model: torch.nn.Module
    file: Path
    size: int
    classes: tuple[str, ...]
    threshold: float
    temperature: float = 1.0
    channels_last: bool = True
    familiarity: Familiarity | None = None


def choose(m: ModelSpec, spec: EngineSpec, verify: Callable[[], Evidence | None] | None,
           calibration: Callable | None = None, verify_id: str = "") -> tuple[Runner, str]:
    """The fastest runner whose quality was verified; also what was decided and why.

    ``verify()`` gives the gate's Evidence (None when there are no images to check on);
    ``calibration()`` yields unlabelled normalised batches (int8 calibration).
    """
    exact = torch_runner(m.model, spec.device, "fp32", m.channels_last)
    explicit = spec.precision != "auto"
    notes: list[str] = []
    check = Check(exact, verify, m)
    for eng, prec in candidates(spec.engine, spec.precision, spec.device):
        if (eng, prec) == ("torch", "fp32"):
            return exact, "; ".join(notes + [fp32_why(spec)])
        try:
            runner, note = _try(m, spec, (eng, prec), check, calibration, verify_id)
            return runner, "; ".join(notes + [note])
        except _Refused as exc:
            if explicit:
                raise ConfigError(f"precision: {prec}: {exc}; use precision: auto or fp32"
                                  ) from None
            notes.append(str(exc))
        except ConfigError:
            raise
        except Exception as exc:  # noqa: BLE001 - a failing engine must not end an auto run
            if explicit or spec.engine != "auto":
                raise ConfigError(f"engine: {eng} {prec} failed ({type(exc).__name__}: "
                                  f"{str(exc).splitlines()[0][:200] if str(exc) else ''}); "
                                  "use engine: auto or torch") from None
            log.debug("%s %s failed", eng, prec, exc_info=True)
            notes.append(f"{eng} {prec} failed ({type(exc).__name__}); the traceback is in run.log")
    return exact, "; ".join(notes + ["PyTorch fp32"])


class _Refused(Exception):
    """A candidate that was not verified or did not pass the gate."""


def _verdict_file(m: ModelSpec, spec: EngineSpec, pair, check: Check, verify_id: str) -> Path:
    variant = "features" if isinstance(m.model, WithFeatures) else ""  # another exported graph
    if pair == ("openvino", "fp32"):
        tag = f"exact|{variant}"
    else:
        rule = "none" if m.familiarity is None else f"{m.familiarity.threshold}"
        tag = (f"{m.threshold}|{m.temperature}|{verify_id}|{check.key()}|{GATE}|{variant}|"
               f"{rule}|gate3")  # gate3: verdicts with the band (issue 29)
    return (spec.cache_dir / "engines" / "verdicts" /
            f"{cache_key(m.file, *pair, m.size, tag)}.json")


def _try(m: ModelSpec, spec: EngineSpec, pair: tuple[str, str], check: Check,
         calibration: Callable | None, verify_id: str) -> tuple[Runner, str]:
    eng, prec = pair
    variant = "features" if isinstance(m.model, WithFeatures) else ""
    folder = spec.cache_dir / "engines" / cache_key(m.file, eng, prec, m.size, variant)
    if pair != ("openvino", "fp32"):
        why = check.refusal(f"{eng} {prec}")
        if why:
            raise _Refused(why)
    verdict_file = _verdict_file(m, spec, pair, check, verify_id)
    bound = binding(m.file, folder, verdict_file)
    verdict = cached_verdict(verdict_file, folder, f"{eng} {prec}", bound)
    if verdict is None and pair == ("openvino", "fp32"):
        # the same arithmetic as PyTorch fp32: no gate, but converted afresh (never into a
        # link nor over an entry that cannot be removed) and bound to its files
        if not clear(folder):
            raise _Refused(f"{eng} {prec}: its cache entry {folder} cannot be replaced")
        runner = _runner(m, spec, pair, folder, calibration)
        atomic_text(json.dumps(sealed({"passed": True, "exact": True}, folder, bound),
                               indent=1), verdict_file)
        return runner, runner.name
    if verdict is None:
        runner = _runner(m, spec, pair, folder, calibration)
        verdict = check.verdict(runner)
        atomic_text(json.dumps(sealed(verdict, folder, bound), indent=1), verdict_file)
        log.info("quality gate for %s %s: %s: %s", eng, prec,
                 "passed" if verdict["passed"] else "FAILED", describe_gate(verdict))
        if verdict["passed"]:
            return (_with_exact(runner, check.exact, verdict),
                    f"{runner.name} (verified: {describe_gate(verdict)})")
    elif verdict["passed"]:
        runner = _runner(m, spec, pair, folder, calibration)
        if verdict.get("exact"):
            return runner, runner.name
        return (_with_exact(runner, check.exact, verdict),
                f"{runner.name} (verified earlier: {describe_gate(verdict)})")
    raise _Refused(f"{eng} {prec} refused by the quality gate: {describe_gate(verdict)}")


def _with_exact(runner: Runner, exact: Runner, verdict: dict) -> Runner:
    """A verified candidate with PyTorch fp32 beside it and the differences the gate measured."""
    runner.exact, runner.measured = exact, dict(verdict["discrepancy"])
    return runner


def ensemble_band(runners: list[Runner], threshold: float) -> quality.Band | None:
    """The band of an ensemble's runners (set on each of them), None when all compute fp32.
    Its probabilities and content unfamiliarity are means over the models, so a difference
    of the mean is at most the mean of the models' differences."""
    if all(r.exact is None for r in runners):
        return None
    measured = {k: float(np.mean([(r.measured or {}).get(k, 0.0) for r in runners]))
                for k in quality.FLOOR}
    band = quality.Band(measured, GATE["safety"], threshold)
    for r in runners:
        r.band = band
    return band


def rebuild(models: list, recipes: list[dict | None], device: torch.device) -> list[Runner]:
    """The runners that ``recipes`` (Runner.recipe) describe, for loaded models (nn.models),
    with their band: the verified engine, read from the cache entry the gate verified, and
    PyTorch fp32 beside it (a Ray actor computes as the local process does)."""
    runners = []
    for m, r in zip(models, recipes):
        exact = torch_runner(m.runnable(), device, "fp32", not m.legacy)
        if r is None:
            runners.append(exact)
            continue
        if r["engine"] == "openvino":
            cand = openvino_runner(m.runnable(), m.prep.size, r["precision"], Path(r["folder"]))
        else:
            cand = torch_runner(m.runnable(), device, r["precision"], not m.legacy)
        runners.append(_with_exact(cand, exact, {"discrepancy": r["measured"]}))
    known = [r for r in recipes if r is not None]
    if known:
        band = ensemble_band(runners, known[0]["threshold"])
        band.safety = known[0]["safety"]
        band.learn(known[0].get("band", {}))  # the driver's band, widened before it was sent
    return runners


def _runner(m: ModelSpec, spec: EngineSpec, pair: tuple[str, str], folder: Path,
            calibration: Callable | None) -> Runner:
    engine, precision = pair
    if engine == "openvino":
        return openvino_runner(m.model, m.size, precision, folder, calibration,
                               progress=spec.progress)
    return torch_runner(m.model, spec.device, precision, m.channels_last)
