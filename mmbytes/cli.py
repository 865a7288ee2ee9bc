"""The ``mmbytes`` command: LightningCLI's ``fit``, ``validate``, ``test``, ``predict`` plus ``shards``.

    mmbytes fit --config recipes/quickstart.yaml
    mmbytes shards samples/ --out data/mine --codec auto
    mmbytes sample --ckpt runs/quickstart/version_0/checkpoints/last.ckpt --modality text --num 4 --out out/
"""

from __future__ import annotations

import sys

from lightning.pytorch.cli import LightningCLI

EXTRA = {
    "shards": ("mmbytes.shards", "write webdataset shards + manifest from files"),
    "sample": ("mmbytes.sample", "generate PNG / WAV / text / raw files from a checkpoint"),
    "compare": ("mmbytes.compare", "byte model vs VQ-VAE + prior on the same validation files: report, plots"),
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
            self._check_ckpt_config(sub, init)

    def before_instantiate_classes(self) -> None:
        sub = self.config.get("subcommand")
        for k, v in getattr(self, "_eval_options", {}).items():
            self.config[sub].model.init_args[k] = v

def main(argv: list[str] | None = None) -> None:
    given = argv
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] in EXTRA:
        import importlib

        importlib.import_module(EXTRA[argv[0]][0]).main(argv[1:])
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
