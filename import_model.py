"""Register an SVD variant and its CLIP image encoder in the BentoML model store.

    MODEL_VERSION=svd_xt python import_model.py           # from the Hugging Face hub (HF_TOKEN)
    python import_model.py --variant svd --from-dir DIR   # from a local copy of the repo
    python import_model.py --variant svd_xt_turbo         # AnimateLCM-SVD-xt's UNet + SVD-XT's VAE, encoder
    python import_model.py --variant demo                 # tiny random weights, no download
    python import_model.py --variant svd_xt --synthetic   # full size, random weights (benchmarks)

Re-running is safe: a model with the same files is not registered twice.
"""

import sys

from bentosvd.weights.importer import main

if __name__ == "__main__":
    sys.exit(main())
