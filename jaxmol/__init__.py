"""jaxmol: cross-modal text <-> molecule retrieval (CMTMR) in JAX/Flax.

Importing the package has no side effects; sub-modules are imported on demand so that
`import jaxmol.losses` pulls in JAX only (no Flax, no RDKit).
"""

__version__ = "0.1.0"
