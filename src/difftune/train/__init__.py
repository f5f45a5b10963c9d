"""The training run both scripts share: its flags (`args`), the start (`run_setup`) and resume (`resume`),
where frozen models live (`placement`), the loop (`loop`), optimizer updates across processes (`updates`,
`deepspeed_zero`), the objective (`objectives`) and the held-out loss (`evaluation`).

The top layer: may import every other package of difftune.
"""
