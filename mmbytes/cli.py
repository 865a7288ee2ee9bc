"""The ``mmbytes`` command: LightningCLI's ``fit``, ``validate``, ``test``, ``predict`` plus ``shards``.

    mmbytes fit --config recipes/quickstart.yaml
    mmbytes shards samples/ --out data/mine --codec auto
    mmbytes sample --ckpt runs/quickstart/version_0/checkpoints/last.ckpt --modality text --num 4 --out out/
    mmbytes calibrate --ckpt ENTROPY.ckpt --data data/mixed --out runs/entropy_calibrated
    mmbytes study --data data/text --budget 3e13 --models small,transformer-small,bpe-small --out runs/study
"""

from __future__ import annotations

import sys

from lightning.pytorch.cli import LightningCLI

EXTRA = {
    "shards": ("mmbytes.shards", "write webdataset shards + manifest from files"),
    "sample": ("mmbytes.sample", "generate PNG / WAV / text / raw files from a checkpoint"),
    "compare": ("mmbytes.compare", "byte model vs VQ-VAE + prior on the same validation files: report, plots"),
    "calibrate": ("mmbytes.entropy:calibrate_main", "BLT: per-modality entropy thresholds for a mean patch size"),
    "patches": ("mmbytes.entropy:patches_main", "BLT: PNG of a file's entropy curve and patch boundaries"),
    "study": ("mmbytes.study", "models at one training-FLOP budget on the same shards: report, bpb against FLOPs"),
}


EVAL_OPTIONS = ("strided_eval",)


class MmbytesCLI(LightningCLI):
    def add_arguments_to_parser(self, parser) -> None:
        parser.set_defaults({
            "model": {"class_path": "mmbytes.lit.ByteLM"},
            "data": {"class_path": "datamodules.ByteDataModule"},
            "trainer.gradient_clip_val": 1.0,
        })

    def instantiate_trainer(self, **kwargs):
        """Checkpoints are written atomically (``AtomicCheckpointIO``) unless the run names a checkpoint IO of its own;
        other plugins given on the command line are kept."""
        from lightning.fabric.plugins import CheckpointIO

        from mmbytes.checkpoint import AtomicCheckpointIO

        plugins = kwargs.get("plugins", self._get(self.config_init, "trainer", default={}).get("plugins"))
        plugins = [] if plugins is None else list(plugins) if isinstance(plugins, list | tuple) else [plugins]
        if not any(isinstance(p, CheckpointIO) for p in plugins):
            plugins.append(AtomicCheckpointIO())
        return super().instantiate_trainer(**{**kwargs, "plugins": plugins})

    def _check_ckpt_config(self, sub: str, init: dict | None) -> None:
        """A model configuration given for this run (anything but the defaults) must match the checkpoint's: refuse
        with the differing fields named rather than let Lightning swap in the checkpoint's or fail on tensor sizes."""
        import inspect
        from pathlib import Path

        from mmbytes.checkpoint import check_config, checkpoint_config
        from mmbytes.lit import ByteLM
        from mmbytes.model.registry import config_from_name

        ckpt_path = self.config[sub].get("ckpt_path")
        if init is None or "size" not in init or not ckpt_path or not Path(ckpt_path).is_file():  # not a ByteLM
            return  # "last" and the like are resolved by the Trainer; ByteLM.on_load_checkpoint checks those
        defaults = inspect.signature(ByteLM.__init__).parameters
        if all(init.get(k) == defaults[k].default for k in ("size", "overrides")):
            return  # no architecture asked for: it comes from the checkpoint
        import torch

        ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=True, mmap=True)
        check_config(checkpoint_config(ckpt), config_from_name(init.get("size"), **(init.get("overrides") or {})),
                     ckpt_path)

    def _parse_ckpt_path(self) -> None:
        """Lightning takes every model argument from a given checkpoint's hyperparameters. The architecture must come
        from there, but evaluation options (``--model.strided_eval``) are the user's to choose at evaluation time."""
        sub = self.config.get("subcommand")
        init = self.config[sub].model.get("init_args") if sub else None
        given = {k: init.get(k) for k in EVAL_OPTIONS if k in init} if init is not None else {}  # ByteLM's only
        if sub:
            self._check_ckpt_config(sub, init)
        super()._parse_ckpt_path()
        if given:
            for k, v in given.items():
                self.config[sub].model.init_args[k] = v


def main(argv: list[str] | None = None) -> None:
    given = argv
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] in EXTRA:
        import importlib

        module, _, function = EXTRA[argv[0]][0].partition(":")
        getattr(importlib.import_module(module), function or "main")(argv[1:])
        return
    if not argv or argv[0] in ("-h", "--help"):
        print("mmbytes commands besides LightningCLI's fit/validate/test/predict:")
        for name, (_, what) in EXTRA.items():
            print(f"  {name:10s} {what}")
        print()
    run_cli(given)  # None: LightningCLI reads sys.argv itself


def run_cli(argv: list[str] | None, **kwargs) -> MmbytesCLI:
    from lightning.pytorch import LightningDataModule, LightningModule

    return MmbytesCLI(LightningModule, LightningDataModule, subclass_mode_model=True, subclass_mode_data=True,
                      args=argv, save_config_kwargs={"overwrite": True}, **kwargs)


if __name__ == "__main__":
    main()
