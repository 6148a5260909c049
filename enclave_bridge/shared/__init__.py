"""What both sides of the trust boundary must agree on: errors, framing, keys and message formats
(windows, alerts, policy, rules, attestation evidence), and the ring arithmetic and linear-op
semantics the enclave and the GPU worker compute in. It imports only itself and third-party
libraries. It runs inside the enclave too, so the measurement covers it with `measured`.
"""
