"""fusionkern: fast FusionNet cement-plant detection on Landsat-8 (Triton kernels, ONNX/TensorRT export, scanning)."""

from pathlib import Path

from setuptools import find_packages, setup

HERE = Path(__file__).parent

setup(
    name="fusionkern",
    version="0.1.0",
    description=__doc__,
    long_description=(HERE / "README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",  # match statements and PEP 604 unions in annotations
    packages=find_packages(include=["fusionkern", "fusionkern.*"]) + ["fusionkern.kernels", "fusionkern.export"],
    # kernels/ and export/ live at the top of the repository but only ever install under fusionkern.
    package_dir={
        "fusionkern": "fusionkern",
        "fusionkern.kernels": "kernels",
        "fusionkern.export": "export",
    },
    install_requires=[
        # 2.1: torch.load(weights_only=True) refuses arbitrary pickles and torch.func/SDPA APIs we rely on;
        # no upper bound: the Makefile pins the CPU wheel on machines without a GPU.
        "torch>=2.1",
        # 1.24: numpy.random.Generator API used throughout and the first release tested with Python 3.11.
        "numpy>=1.24",
        # 5.4: yaml.safe_load behaviour we rely on for config files (no arbitrary object construction).
        "pyyaml>=5.4",
        # 4.64: tqdm.contrib.logging and the postfix API used by the progress bars.
        "tqdm>=4.64",
    ],
    extras_require={
        # Raster I/O. rasterio 1.3: rasterio.windows.from_bounds(..., transform) and the WarpedVRT options used;
        # Pillow 9.1: Image.Resampling and the mode handling used to read the authors' PNG/JPG chips.
        "geo": ["rasterio>=1.3", "pillow>=9.1"],
        # Triton kernels. 3.0: tl.extra-free API, triton.compile(ASTSource, target=GPUTarget) for the sm_90 test.
        "kernels": ["triton>=3.0"],
        # ONNX export. onnx 1.14 ships opset 18 (the default export opset); onnxruntime 1.16 runs opset 18.
        # onnxscript 0.7: the torch.export-based ONNX exporter of torch >= 2.11 imports its torch_2_11 API.
        "export": ["onnx>=1.14", "onnxruntime>=1.16", "onnxscript>=0.7"],
        # TensorRT engines. 10.0: the execute_async_v3 / named-tensor API; 11 is also supported.
        "trt": ["tensorrt>=10.0"],
        # Distributed scans on core Ray (actors pinned to nodes with NodeAffinitySchedulingStrategy, runtime-context
        # node ids); 2.10 stays the floor (the API used is older; token authentication needs a recent Ray anyway).
        "ray": ["ray>=2.10"],
        # Scan outputs. pyarrow 14.0.1 fixes CVE-2023-47248 (GeoParquet writing); matplotlib 3.6 for quicklooks.
        "scan": ["pyarrow>=14.0.1", "matplotlib>=3.6"],
        # Benchmarks (`fusionkern bench` runs pytest in-process). pytest 7.0 for the ini options in pyproject.toml;
        # pytest-benchmark 4.0: the pedantic API and JSON output we parse; matplotlib 3.6 for plots.
        "bench": ["pytest>=7.0", "pytest-benchmark>=4.0", "matplotlib>=3.6"],
        # Paper experiments: matplotlib 3.6 for the figure API used; scikit-learn 1.2, the first release where
        # TSNE's init="pca" and learning_rate="auto" (passed explicitly) are the settled defaults.
        "experiments": ["matplotlib>=3.6", "scikit-learn>=1.2"],
        # ImageNet baselines: torchvision 0.13 introduced the *_Weights API used; it must match the torch build.
        "baselines": ["torchvision>=0.13"],
        # Tests. pytest 7.0: pytest.importorskip(..., reason=) and the ini options in pyproject.toml; pystac 1.12,
        # the first to read STAC 1.1.0 items and the projection extension v2.0.0 (proj:code) as written, for the
        # round trip of the scan's STAC item.
        "dev": ["pytest>=7.0", "pytest-benchmark>=4.0", "matplotlib>=3.6", "pystac>=1.12"],
    },
    entry_points={"console_scripts": ["fusionkern=fusionkern.cli:main"]},
)
