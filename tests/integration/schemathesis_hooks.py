"""Schemathesis hooks (SCHEMATHESIS_HOOKS=tests.integration.schemathesis_hooks): valid values for
the served schema's "png-base64" strings, greyscale PNGs of BIGLEARN_PNG_SHAPE ("HxW") pixels."""

import os

import numpy as np
import schemathesis
from hypothesis import strategies as st

from biglearn.serving import grey_image, png_base64

if os.environ.get("BIGLEARN_PNG_SHAPE"):
    HEIGHT, WIDTH = (int(n) for n in os.environ["BIGLEARN_PNG_SHAPE"].split("x"))
    pixels = st.lists(st.integers(0, 255), min_size=HEIGHT * WIDTH, max_size=HEIGHT * WIDTH)
    schemathesis.openapi.format(
        "png-base64", pixels.map(lambda p: png_base64(grey_image(np.array(p), (HEIGHT, WIDTH), 256)))
    )
