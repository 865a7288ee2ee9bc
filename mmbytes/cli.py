"""The ``mmbytes`` command: LightningCLI's ``fit``, ``validate``, ``test``, ``predict`` plus ``shards``.

    mmbytes fit --config recipes/quickstart.yaml
    mmbytes shards samples/ --out data/mine --codec auto
    mmbytes sample --ckpt runs/quickstart/version_0/checkpoints/last.ckpt --modality text --num 4 --out out/
    mmbytes calibrate --ckpt ENTROPY.ckpt --data data/mixed --out runs/entropy_calibrated
    mmbytes compress --ckpt runs/quickstart/version_0/checkpoints/last.ckpt notes.txt --out packed/
    mmbytes study --data data/text --budget 3e13 --models small,transformer-small,bpe-small --out runs/study
    mmbytes fit --config recipes/quickstart.yaml --ckpt_path last     # resume the newest run of that recipe

Threads: unless ``OMP_NUM_THREADS`` is set or ``--threads N`` is given, torch's intra-op threads are set to half the
CPUs this process may run on, at least 1 and at most 8 (``default_threads``): small models gain little from more,
and on a machine shared with other work, threads that wait for busy cores slow every step down many times over.
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

from lightning.pytorch.cli import LightningCLI

EXTRA = {
    "shards": ("mmbytes.shards", "write webdataset shards + manifest from files"),
    "sample": ("mmbytes.sample", "generate PNG / WAV / text / raw files from a checkpoint"),
    "compare": ("mmbytes.compare", "byte model vs VQ-VAE + prior on the same validation files: report, plots"),
    "calibrate": ("mmbytes.entropy:calibrate_main", "BLT: per-modality entropy thresholds for a mean patch size"),
    "patches": ("mmbytes.entropy:patches_main", "BLT: PNG of a file's entropy curve and patch boundaries"),
    "compress": ("mmbytes.compress", "compress files losslessly with a trained model (arithmetic coding) -> .mmbz"),
    "decompress": ("mmbytes.compress:main_decompress", "decompress .mmbz files with the model that compressed them"),
    "study": ("mmbytes.study", "models at one training-FLOP budget on the same shards: report, bpb against FLOPs"),
}


EVAL_OPTIONS = ("strided_eval",)
THREADS_HELP = ("threads: torch's intra-op threads are half the CPUs this process may use (1 to 8) unless "
                "OMP_NUM_THREADS is set or --threads N is given (anywhere on the command line)")


class MmbytesCLI(LightningCLI):
    def add_arguments_to_parser(self, parser) -> None:
        parser.set_defaults({
            "model": {"class_path": "mmbytes.lit.ByteLM"},
            "data": {"class_path": "datamodules.ByteDataModule"},
            "trainer.gradient_clip_val": 1.0,
        })

    def instantiate_trainer(self, **kwargs):
        """Checkpoints are written atomically (``AtomicCheckpointIO``) unless the run names a checkpoint IO of its own;
        other plugins given on the command line are kept. Every checkpoint holds the data description
        (``DataDescription``)."""
        from lightning.fabric.plugins import CheckpointIO

        from mmbytes.checkpoint import AtomicCheckpointIO

        plugins = kwargs.get("plugins", self._get(self.config_init, "trainer", default={}).get("plugins"))
        plugins = [] if plugins is None else list(plugins) if isinstance(plugins, list | tuple) else [plugins]
        if not any(isinstance(p, CheckpointIO) for p in plugins):
            plugins.append(AtomicCheckpointIO())
        trainer = super().instantiate_trainer(**{**kwargs, "plugins": plugins})
        from mmbytes.callbacks import DataDescription

        if not any(isinstance(c, DataDescription) for c in trainer.callbacks):  # every checkpoint describes its data
            trainer.callbacks.append(DataDescription())
        return trainer

    def _check_ckpt_config(self, sub: str, init: dict | None) -> None:
        """A model configuration given for this run (anything but the defaults) must match the checkpoint's: refuse
        with the differing fields named rather than let Lightning swap in the checkpoint's or fail on tensor sizes."""
        import inspect
        from pathlib import Path

        from mmbytes.checkpoint import check_config, checkpoint_config
        from mmbytes.lit import ByteLM, model_config

        ckpt_path = self.config[sub].get("ckpt_path")
        if ckpt_path and Path(ckpt_path).is_file():
            from mmbytes.checkpoint import verify_checkpoint

            verify_checkpoint(ckpt_path)  # damaged, pickled or of a wrong inside: one line naming the file and field
        if init is None or "size" not in init or not ckpt_path or not Path(ckpt_path).is_file():  # not a ByteLM
            return  # "last" and the like are resolved by the Trainer; ByteLM.on_load_checkpoint checks those
        defaults = inspect.signature(ByteLM.__init__).parameters
        if all(init.get(k) == defaults[k].default for k in ("size", "overrides", "preset")):
            return  # no architecture asked for: it comes from the checkpoint
        import torch

        ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=True, mmap=True)
        theirs, overrides = checkpoint_config(ckpt), dict(init.get("overrides") or {})
        entropy = init.get("entropy_ckpt")
        if entropy and not Path(entropy).is_file() and isinstance(getattr(theirs, "entropy", None), dict):
            overrides.setdefault("entropy", theirs.entropy)  # BLT: the entropy model travels in the checkpoint
        check_config(theirs, model_config(init.get("size"), overrides, entropy, init.get("preset")), ckpt_path)

    def parse_arguments(self, parser, args) -> None:
        """Lightning then takes every model argument from a given checkpoint's hyperparameters (lightning >= 2.5).
        The architecture must come from there (a different one asked for is refused first), but evaluation options
        (``--model.strided_eval``) are the user's to choose at evaluation time: kept here, put back in
        ``before_instantiate_classes``."""
        super().parse_arguments(parser, args)
        sub = self.config.get("subcommand")
        init = self.config[sub].model.get("init_args") if sub else None
        self._eval_options = {k: init.get(k) for k in EVAL_OPTIONS if k in init} if init is not None else {}
        if sub:
            check_model_size(self.config[sub].model)
            check_accelerator(self.config[sub].trainer.get("accelerator"))
            if self.config[sub].get("ckpt_path") == "last":
                self.config[sub].ckpt_path = str(find_last_checkpoint(self.config[sub]))
                print(f"mmbytes: --ckpt_path last: {self.config[sub].ckpt_path}", file=sys.stderr)
            self._check_ckpt_config(sub, init)

    def before_instantiate_classes(self) -> None:
        sub = self.config.get("subcommand")
        link_patch_size(self.config[sub] if sub else self.config)
        for k, v in getattr(self, "_eval_options", {}).items():
            self.config[sub].model.init_args[k] = v

def check_model_size(model) -> None:
    """A ``ByteLM`` size (preset, overrides) the registry does not know: one line naming the known sizes, before the
    parser's instantiation wraps the error in a Union-type report."""
    init = model.get("init_args") if model is not None and hasattr(model, "get") else None
    if init is None or "size" not in init or not str(model.get("class_path", "")).endswith("ByteLM"):
        return
    from mmbytes.errors import OptionError
    from mmbytes.model.registry import config_from_name

    try:
        config_from_name(init.get("size"), init.get("preset"), **dict(init.get("overrides") or {}))
    except ValueError as e:
        raise OptionError(f"--model.size/--model.preset/--model.overrides: {e}") from None


def link_patch_size(config) -> None:
    """``data.patch_size`` follows the model: left out, it becomes the window alignment of the ``ByteLM``'s config
    (``window_alignment``: P for fixed patches, 1 where patches follow the content); given and different, one line
    naming both. Data modules without the argument, and models other than a named ``ByteLM`` size, are left alone."""
    model, data = config.get("model"), config.get("data")
    init = model.get("init_args") if model is not None and hasattr(model, "get") else None
    data_init = data.get("init_args") if data is not None and hasattr(data, "get") else None
    if init is None or data_init is None or "size" not in init or "patch_size" not in data_init:
        return
    if not str(model.get("class_path", "")).endswith("ByteLM"):
        return
    from mmbytes.errors import OptionError
    from mmbytes.model.registry import config_from_name

    align = config_from_name(init.get("size"), init.get("preset"), **dict(init.get("overrides") or {})).window_alignment
    given = data_init.get("patch_size")
    if given is None:
        data_init["patch_size"] = align
    elif given != align:
        raise OptionError(f"--data.patch_size {given}: the model {init.get('size')} aligns windows to {align} bytes; "
                          "leave data.patch_size out and it follows the model")


def check_accelerator(name) -> None:
    """``--trainer.accelerator`` naming a kind of device this machine does not have (``cuda`` without a GPU): one
    line naming the accelerators it has, instead of Lightning's traceback."""
    if not isinstance(name, str) or name == "auto":
        return
    from lightning.pytorch.accelerators import AcceleratorRegistry

    from mmbytes.errors import OptionError

    known = sorted(AcceleratorRegistry.available_accelerators())
    here = [n for n in known if AcceleratorRegistry[n]["accelerator"].is_available()]
    wanted = ["cuda", "mps"] if name == "gpu" else [name]
    if name != "gpu" and name not in known:
        raise OptionError(f"--trainer.accelerator {name}: unknown; choose one of auto, gpu, {', '.join(known)}")
    if not any(n in here for n in wanted):
        raise OptionError(f"--trainer.accelerator {name}: no such device on this machine (torch {_torch_build()}); "
                          f"available here: auto, {', '.join(here)}")


def _torch_build() -> str:
    import torch

    return f"{torch.__version__}, " + (f"built for CUDA {torch.version.cuda}" if torch.version.cuda else
                                       "a build without CUDA")


def find_last_checkpoint(config) -> Path:
    """``--ckpt_path last``: the ``last.ckpt`` of the newest earlier run of the same logger ``save_dir``/``name`` (the
    highest ``version_N`` that has ``checkpoints/last.ckpt``; only the given version when the logger names one), or
    of the ``dirpath`` a ModelCheckpoint is given; without a logger, ``<default_root_dir>/checkpoints``. Lightning
    itself would look in the new run's own, still empty, folder and train from step 0. None found: ``OptionError``
    naming where it looked."""
    from mmbytes.errors import OptionError

    trainer = config.trainer
    root = Path(trainer.get("default_root_dir") or ".")
    callbacks = trainer.get("callbacks") or []
    callbacks = callbacks if isinstance(callbacks, list) else [callbacks]
    places = [Path(c.init_args.dirpath) for c in callbacks if str(c.get("class_path", "")).endswith("ModelCheckpoint")
              and c.get("init_args") is not None and c.init_args.get("dirpath")]
    logger = trainer.get("logger")
    logger = logger[0] if isinstance(logger, list) and logger else logger
    looked: list[str] = []
    found: list[Path] = []
    if places:
        found = [p / "last.ckpt" for p in places]
        looked = [str(p / "last.ckpt") for p in places]
    elif logger is False or (isinstance(logger, list) and not logger):
        found = [root / "checkpoints" / "last.ckpt"]
        looked = [str(found[0])]
    else:
        init = (logger.get("init_args") if hasattr(logger, "get") else None) or {}
        base = Path(init.get("save_dir") or root) / (init.get("name", "lightning_logs") or "")
        version = init.get("version")
        if version is not None:
            folder = version if isinstance(version, str) else f"version_{version}"
            found = [base / folder / "checkpoints" / "last.ckpt"]
            looked = [str(found[0])]
        else:
            numbered = [(int(p.name.removeprefix("version_")), p) for p in base.glob("version_*")
                        if p.name.removeprefix("version_").isdigit()]
            found = [p / "checkpoints" / "last.ckpt" for _, p in sorted(numbered, reverse=True)]
            looked = [str(base / "version_*" / "checkpoints" / "last.ckpt")]
    for path in found:
        if path.is_file():
            return path
    raise OptionError(f"--ckpt_path last: no last.ckpt in {' or '.join(looked)}; give the checkpoint's path, or check "
                      "the logger's save_dir and name (a run resumes the newest run of the same logger)")


def default_threads() -> int:
    """Half the CPUs this process may run on, at least 1 and at most 8."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cpus = os.cpu_count() or 1
    return max(1, min(8, cpus // 2))


def set_threads(argv: list[str], from_sys: bool = True) -> list[str]:
    """Take ``--threads N`` out of ``argv`` (and out of ``sys.argv`` when ``from_sys``: LightningCLI reads it) and set
    torch's intra-op threads: N, else ``OMP_NUM_THREADS`` when set (torch reads it itself), else, for the command
    (``from_sys``; a Python caller keeps its own setting), ``default_threads()``. The choice is also put in
    ``OMP_NUM_THREADS``, so processes this one starts (DDP ranks, data workers) use it too."""
    from mmbytes.errors import OptionError

    rest, given = [], None
    it = iter(argv)
    for a in it:
        if a == "--threads" or a.startswith("--threads="):
            value = a.partition("=")[2] if "=" in a else next(it, "")
            if not value.isdigit() or int(value) < 1:
                raise OptionError(f"--threads {value}: give a whole number of at least 1")
            given = int(value)
        else:
            rest.append(a)
    if from_sys:
        sys.argv[1:] = rest
    if given is None and (os.environ.get("OMP_NUM_THREADS") or not from_sys):
        return rest
    n = given or default_threads()
    os.environ["OMP_NUM_THREADS"] = str(n)
    import torch

    torch.set_num_threads(n)
    return rest


DEBUG_ENV = "MMBYTES_DEBUG"
SIGTERM_GRACE_S = 5.0


def main(argv: list[str] | None = None, *, friendly: bool | None = None) -> None:
    """The ``mmbytes`` command. As a command (``friendly``, the default when ``argv`` is None) the project's own
    errors and expected OS errors end the run with one line naming the file and what to do, and exit status 1;
    ``--debug`` (anywhere in the arguments) or ``MMBYTES_DEBUG=1`` shows the traceback instead. Called with ``argv``
    from Python, errors are raised as they are."""
    friendly = argv is None if friendly is None else friendly
    from_sys = argv is None
    argv = sys.argv[1:] if argv is None else list(argv)
    debug = "--debug" in argv or os.environ.get(DEBUG_ENV, "") not in ("", "0")
    argv = [a for a in argv if a != "--debug"]
    if from_sys:
        sys.argv[1:] = argv  # LightningCLI reads sys.argv itself (given args, it warns they are meant for Python)
    if not friendly or debug:
        return _main(set_threads(argv, from_sys), friendly, from_sys)
    try:
        _main(set_threads(argv, from_sys), friendly, from_sys)
    except KeyboardInterrupt:
        print("mmbytes: interrupted", file=sys.stderr)
        sys.exit(130)
    except Exception as e:
        line = one_line(e)
        if line is None:
            raise
        print(f"mmbytes: error: {line} (--debug or {DEBUG_ENV}=1 shows the traceback)", file=sys.stderr)
        sys.exit(1)


def _main(argv: list[str], friendly: bool, from_sys: bool) -> None:
    if argv and argv[0] in EXTRA:
        import importlib

        old = stop_on_sigterm(grace=0.0) if friendly else None  # no Lightning loop to finish: stop now, cleanly
        try:
            module, _, function = EXTRA[argv[0]][0].partition(":")
            getattr(importlib.import_module(module), function or "main")(argv[1:])
        finally:
            if old is not None:
                signal.signal(signal.SIGTERM, old)
        return
    if not argv or argv[0] in ("-h", "--help"):
        print("mmbytes commands besides LightningCLI's fit/validate/test/predict:")
        for name, (_, what) in EXTRA.items():
            print(f"  {name:10s} {what}")
        print("  --debug    show the traceback of an error (or set MMBYTES_DEBUG=1)")
        print("  --threads N  torch's intra-op threads (default: half the CPUs this process may use, 1 to 8, unless "
              "OMP_NUM_THREADS is set)")
        print()
    from mmbytes.argtypes import yaml_config

    for i, arg in enumerate(argv):  # config files are checked before jsonargparse expands them
        if arg in ("-c", "--config") and i + 1 < len(argv):
            yaml_config(argv[i + 1])
        elif arg.startswith("--config="):
            yaml_config(arg.partition("=")[2])
    old = stop_on_sigterm(grace=SIGTERM_GRACE_S) if friendly else None
    quiet = {"exit_on_error": False, **{s: {"exit_on_error": False} for s in ("fit", "validate", "test", "predict")}}
    try:
        run_cli(None if from_sys else argv, **({"parser_kwargs": quiet} if friendly else {}))
    finally:
        if old is not None:
            signal.signal(signal.SIGTERM, old)


def stop_on_sigterm(grace: float):
    """SIGTERM always stops the run. Lightning, while a Trainer runs, adds its own handler in front of this one and
    stops between batches; a run that does not reach a batch boundary within ``grace`` seconds (waiting for data
    that never comes, or outside a Trainer) is interrupted as by Ctrl-C, and a second SIGTERM interrupts at once."""
    import threading

    if threading.current_thread() is not threading.main_thread():  # signals are the main thread's only
        return None
    state = {"seen": 0}
    main_thread = threading.main_thread().ident

    def handler(signum, frame) -> None:
        state["seen"] += 1
        if grace <= 0 or state["seen"] > 1:
            raise KeyboardInterrupt
        # a real SIGINT to the main thread: it also breaks a blocking read or open (PEP 475 runs the handler)
        timer = threading.Timer(grace, signal.pthread_kill, (main_thread, signal.SIGINT))
        timer.daemon = True
        timer.start()

    return signal.signal(signal.SIGTERM, handler)  # the handler it replaces


def one_line(e: BaseException) -> str | None:
    """The message of an error a user can act on, as one line naming the file, or None for a bug (traceback)."""
    import errno
    from argparse import ArgumentError

    from mmbytes.errors import MmbytesError
    from mmbytes.lit import NonFiniteLossError

    if isinstance(e, ArgumentError):  # a config or option jsonargparse refused: its first lines name the key
        lines = [x.strip() for x in str(e).strip().splitlines() if x.strip()]
        problem = next((i for i, x in enumerate(lines) if x.startswith("- Problem with given")), None)
        if problem is None:
            return " ".join(lines[:2]) if lines else "invalid arguments"
        detail = []
        for x in lines[problem + 1:]:  # the nested reason, up to the next alternative
            if x.startswith(("- ", "Given value")):
                break
            detail.append(x)
        return " ".join([lines[0], lines[problem].removeprefix("- "), *detail])
    if isinstance(e, MmbytesError | NonFiniteLossError):
        text = str(e).strip()
        if "Original Traceback" in text:  # raised in a data loader worker: the last line is the error itself
            text = text.splitlines()[-1].split(": ", 1)[-1]
        return text.splitlines()[0] if text else type(e).__name__
    if isinstance(e, OSError):
        what = {errno.ENOSPC: "free space or write elsewhere", errno.EDQUOT: "free space or write elsewhere",
                errno.EACCES: "check its permissions", errno.EPERM: "check its permissions",
                errno.ENOENT: "check the path", errno.EISDIR: "give a file, not a folder",
                errno.ENOTDIR: "a part of the path is a file, not a folder", errno.EROFS: "write elsewhere",
                errno.ELOOP: "fix the symlink loop"}.get(e.errno)
        if e.filename is None:
            return f"{e.strerror or e}" + (f": {what}" if what else "")
        where = f"{e.filename}" + (f" -> {e.filename2}" if e.filename2 else "")
        return f"{where}: {e.strerror or e}" + (f"; {what}" if what else "")
    return None


def run_cli(argv: list[str] | None, **kwargs) -> MmbytesCLI:
    """The LightningCLI; its parsers (the main one and each subcommand's) refuse abbreviated options, so a misspelt
    ``--trainer.max_step`` is an error, not ``max_steps``."""
    from lightning.pytorch import LightningDataModule, LightningModule

    parser_kwargs = {"allow_abbrev": False, "epilog": THREADS_HELP,
                     **{sub: {"epilog": THREADS_HELP} for sub in ("fit", "validate", "test", "predict")},
                     **kwargs.pop("parser_kwargs", {})}
    return MmbytesCLI(LightningModule, LightningDataModule, subclass_mode_model=True, subclass_mode_data=True,
                      args=argv, save_config_kwargs={"overwrite": True}, parser_kwargs=parser_kwargs, **kwargs)


if __name__ == "__main__":
    main()
