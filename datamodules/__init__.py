"""LightningDataModules over webdataset shards written by ``mmbytes shards``."""

from datamodules.bytes import ByteDataModule
from datamodules.mixed import MixedDataModule
from datamodules.vq import VQDataModule

__all__ = ["ByteDataModule", "MixedDataModule", "VQDataModule"]
