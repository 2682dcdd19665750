"""The files a Hugging Face model directory of a BD3-LM carries (docs/convert.md, "Hugging Face").

``configuration_bd3lm.py``, ``modeling_bd3lm.py`` and ``tokenization_bd3lm.py`` are copied as they
are into every exported directory, where ``transformers`` loads them with
``trust_remote_code=True``. So they import only torch, transformers, sentencepiece and each other
(relatively), never megatron_bd3. This package is their one source; tests/convert compares them
numerically with the standalone network (megatron_bd3/standalone/model.py).
"""

from pathlib import Path

HF_FILES_DIR = Path(__file__).parent
CONFIGURATION_FILE = "configuration_bd3lm.py"
MODELING_FILE = "modeling_bd3lm.py"
TOKENIZATION_FILE = "tokenization_bd3lm.py"
