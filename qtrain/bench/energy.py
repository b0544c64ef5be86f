"""Energy and CO2 of a bench row, through CodeCarbon's offline tracker.

CodeCarbon measures with RAPL where the kernel exposes it; otherwise it *estimates* CPU power from the CPU's TDP
(scaled by this process's CPU load) and RAM power from a constant. Which of the two happened is not in its public
results, so :func:`energy_mode` reads the tracker's hardware objects (private attributes: a CodeCarbon upgrade
can move them, and the label then says "None"); a sanity check recomputes the CPU energy as CPU seconds x (TDP /
cores).
"""

from __future__ import annotations

import os


def start_tracker(country: str):
    """A started ``OfflineEmissionsTracker`` for this process, or None when CodeCarbon is not installed."""
    try:
        from codecarbon import OfflineEmissionsTracker
    except ImportError:
        return None
    tracker = OfflineEmissionsTracker(country_iso_code=country, log_level="error", save_to_file=False,
                                      measure_power_secs=5, tracking_mode="process")
    tracker.start()
    return tracker


def stop_tracker(tracker, cpu_s: float) -> dict:
    """Stop ``tracker``; its energy, CO2, power figures and how they were obtained."""
    co2 = tracker.stop()
    d = tracker.final_emissions_data
    mode = energy_mode(tracker)
    cores = d.cpu_count or os.cpu_count()
    expected = (cpu_s * mode["tdp_w"] / cores / 3.6e6) if mode["tdp_w"] else None
    return {"kwh": d.energy_consumed, "cpu_kwh": d.cpu_energy, "ram_kwh": d.ram_energy, "gpu_kwh": d.gpu_energy,
            "co2_kg": co2, "country": d.country_name, "duration_s": d.duration, "cpu_power_w": d.cpu_power,
            "ram_power_w": d.ram_power, "cpu_count": cores, **mode,
            "sanity": {"cpu_seconds": round(cpu_s, 2), "tdp_per_core_w": (mode["tdp_w"] / cores) if mode["tdp_w"] else None,
                       "expected_cpu_kwh": expected, "ratio": (d.cpu_energy / expected) if expected else None}}


def energy_mode(tracker) -> dict:
    """How CodeCarbon got its CPU figure: measured (RAPL, powermetrics) or estimated (TDP x load, constant)."""
    out = {"cpu_mode": None, "tdp_w": None, "measured": False}
    for h in getattr(tracker, "_hardware", []):
        if type(h).__name__ == "CPU":
            mode = getattr(h, "_mode", None)
            out["cpu_mode"] = mode
            out["tdp_w"] = getattr(h, "_tdp", None)
            out["measured"] = mode in ("intel_rapl", "apple_powermetrics", "intel_power_gadget")
        if type(h).__name__ == "GPU":
            out["gpu"] = "pynvml (measured)"
    out["label"] = ("measured (" + str(out["cpu_mode"]) + ")" if out["measured"] else
                    f"ESTIMATE: {out['cpu_mode']} (TDP {out['tdp_w']} W x CPU load)" if out["cpu_mode"] == "cpu_load" else
                    f"ESTIMATE: {out['cpu_mode']}")
    return out
