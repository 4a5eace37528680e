"""mm_moslora's tests. A regular package (this file) so that `tests.helpers` is always ours: a full lmms-eval
install brings latex2sympy2, which puts its own top-level `tests` package into site-packages, and a regular
package there would win over a namespace package here (pytest puts the repository root first on sys.path)."""
