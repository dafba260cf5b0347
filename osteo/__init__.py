"""osteo: an MLOps pipeline that gives radiologists an osteoporosis probability per X-ray.

The package holds the shared plumbing (configuration, object storage, the embedded S3 server,
logging and the command line). The pipeline stages live in ``tasks/``, the Prefect flows that
wire them in ``flows/``, and the network and Lightning code in ``models/``.
"""

__version__ = "0.1.0"
