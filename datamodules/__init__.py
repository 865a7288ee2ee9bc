"""LightningDataModules over webdataset shards written by ``mmbytes shards``."""

from datamodules.bytes import ByteDataModule

__all__ = ["ByteDataModule"]
