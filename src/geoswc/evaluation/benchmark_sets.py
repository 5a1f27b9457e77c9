"""The field's geolocation benchmarks and their sizes as published, so that an evaluation can say how many of a
benchmark's photos it actually scored (published results differ partly because photos silently go missing)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

BenchmarkName = Literal["im2gps3k", "yfcc4k", "yfcc26k", "im2gps", "osv5m-test"]


@dataclass(frozen=True)
class Benchmark:
    """A benchmark as published: its photos, and how many of them have coordinates (the rows an evaluation
    expects)."""

    name: str
    photos: int
    expected: int
    source: str
    """Where the numbers come from."""


BENCHMARKS: dict[str, Benchmark] = {
    b.name: b
    for b in (
        # Vo, Jacobs, Hays, ICCV 2017 (3,000 photos); GeoEstimation's im2gps3k_places365.csv has 2,997 rows, 3 photos
        # lacking coordinates: ../shared/data/benchmarks/im2gps3k/SOURCE.md.
        Benchmark("im2gps3k", 3000, 2997, "Vo et al., ICCV 2017; GeoEstimation's im2gps3k_places365.csv (2,997 rows)"),
        # Vo, Jacobs, Hays, ICCV 2017; yfcc4k.csv as published (TransGeoCLIP) has 4,536 rows:
        # ../shared/data/benchmarks/yfcc/SOURCE.md.
        Benchmark("yfcc4k", 4536, 4536, "Vo et al., ICCV 2017; yfcc4k.csv (4,536 rows)"),
        # Müller-Budack et al., ECCV 2018 (GeoEstimation's validation set); yfcc25600_places365.csv has 25,600 rows:
        # ../shared/data/benchmarks/yfcc/SOURCE.md.
        Benchmark("yfcc26k", 25600, 25600, "Müller-Budack et al., ECCV 2018; yfcc25600_places365.csv (25,600 rows)"),
        # Hays and Efros, CVPR 2008: the Im2GPS test set of 237 photos (not in ../shared).
        Benchmark("im2gps", 237, 237, "Hays and Efros, CVPR 2008 (237 photos)"),
        # Astruc et al., CVPR 2024, OpenStreetView-5M: 210,122 test images (not in ../shared).
        Benchmark("osv5m-test", 210122, 210122, "Astruc et al., CVPR 2024, OpenStreetView-5M test split (210,122)"),
    )
}
"""The benchmarks ``geoswc evaluate --benchmark`` knows, by name."""
