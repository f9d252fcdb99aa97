"""Built-in PETL methods; importing this package registers them (installed as ``petl_bench.methods``).

Import order is the order of the Convpass paper's table, then the later methods, used for listings and reports.
"""

from . import baselines, vpt, adapter, adaptformer, lora, noah, convpass  # noqa: F401  isort: skip
from . import ssf, fact, repadapter, difffit, sequential_adapters, binary, peft_tuners  # noqa: F401  isort: skip
from . import adapter_plus, dtl, sct, glora, vqt, e2vpt, dyt, arc, mona  # noqa: F401  isort: skip
