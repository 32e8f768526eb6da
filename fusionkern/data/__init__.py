"""Labelled data: dataset layouts, sites as tensors, the paper's augmentation and splits, a synthetic dataset.

Reading rasters needs the ``geo`` extra (rasterio); PNG/JPG chips need Pillow. Both are imported only when a file
of that kind is read or written.
"""

from fusionkern.data.dataset import SiteDataset, read_image
from fusionkern.data.layouts import JoinReport, Site, load_many, load_sites, read_authors_layout, read_site_layout
from fusionkern.data.splits import CLASS_WEIGHTS, Split, stratified_splits
from fusionkern.data.synthetic import make_synthetic_sites
from fusionkern.data.transforms import SCALINGS, AugmentParams, SiteAugment, minmax_scale, physical_scale

__all__ = [
    "CLASS_WEIGHTS",
    "SCALINGS",
    "AugmentParams",
    "JoinReport",
    "Site",
    "SiteAugment",
    "SiteDataset",
    "Split",
    "load_many",
    "load_sites",
    "make_synthetic_sites",
    "minmax_scale",
    "physical_scale",
    "read_authors_layout",
    "read_image",
    "read_site_layout",
    "stratified_splits",
]
