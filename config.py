"""Every setting, limit and default of BentoSVD: `Settings` (read from the environment),
`VARIANTS` and `Params`. They live in `bentosvd/config.py`; this file keeps the name the
original BentoSVD sample used."""

from bentosvd.config import (  # noqa: F401
                             MAX_FRAMES,
                             MAX_GUIDANCE,
                             MAX_INTERPOLATED_FPS,
                             MAX_SEED,
                             MAX_STEPS,
                             VARIANTS,
                             Params,
                             Settings,
                             Variant,
                             get_settings,
)
