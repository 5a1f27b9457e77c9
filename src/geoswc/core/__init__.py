"""The foundation every layer stands on: error kinds, frozen config dataclasses, atomic writes, sealed JSON records,
checksummed safetensors, artifact folders, sphere math, progress bars, photo-name lists and the torchrun process
group. Imports nothing above it.
"""
