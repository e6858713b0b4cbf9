"""What the demo prints: the evidence tables, the claims they support, and the samples."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

from familial.demo.dae import DaEResult
from familial.demo.recipe import DemoPlan
from familial.demo.samples import columns, sample_members, write_markdown
from familial.eval.evidence import PairedBootstrap, UnitSums, format_report
from familial.infer.sampling import SamplingParams
from familial.model import FamilyModel


def _ci(e: dict, digits: int = 3, sign: bool = False, percent: bool = False) -> str:
    if percent:
        return f"{e['value']:.1%} [{e['low']:.1%}, {e['high']:.1%}]"
    f = f"{{:+.{digits}f}}" if sign else f"{{:.{digits}f}}"
    return f"{f.format(e['value'])} [{f.format(e['low'])}, {f.format(e['high'])}]"


def _verdict(ok: bool) -> str:
    return "yes" if ok else "NO"


def family_section(evidence: dict, layers: dict[str, int], plan: DemoPlan) -> str:
    members = evidence["members"]
    below_bigram = all(m["minus_bigram"]["high"] < 0 for m in members)
    ordered = all(m["minus_previous"]["high"] < 0 for m in members[1:])
    drop = evidence["full_below_smallest"]
    lines = [
        (f"\nheld-out evidence: {evidence['tokens']:,} tokens of standard library files never "
        f"trained on; loss in nats per token; [95% intervals]: paired bootstrap over "
        f"the {evidence['units']} {evidence['unit']}s ({plan.bootstrap} resamples, the same for every row)"),
        format_report(evidence, layers),
        f"every member below the bigram (interval entirely below zero): {_verdict(below_bigram)}",
        f"each deeper member below the one before (interval entirely below zero): {_verdict(ordered)}",
        (f"full member at least 5% below the smallest: {_verdict(drop['low'] >= 0.05)} "
        f"({drop['value']:.1%})"),
    ]
    return "\n".join(lines)


def dae_report(dae: DaEResult, sums: UnitSums, names: list[str], boot: PairedBootstrap) -> dict:
    """Paired statistics of the smallest member before, during and after DaE, and the next member."""
    before = sums.loss[names[0]]
    nxt = sums.loss[names[1]]
    states = {"before": before, **dae.loss}
    out = {"member": dae.member, "next_member": names[1],
           "loss": {k: asdict(boot.per_token(v)) for k, v in states.items()},
           "change": {k: asdict(boot.per_token(v - before)) for k, v in dae.loss.items()},
           "next_member_loss": asdict(boot.per_token(nxt)),
           "trained_minus_next": asdict(boot.per_token(dae.loss["trained"] - nxt)),
           "gain_kept": asdict(boot.ratio(before - dae.loss["healed"], before - dae.loss["trained"])),
           "gain_kept_unhealed": asdict(boot.ratio(before - dae.loss["compressed"],
                                                   before - dae.loss["trained"])),
           "parameters": dict(dae.parameters), "added": dae.added,
           "added_compressed": dae.added_compressed, "trainable": dae.trainable,
           "seconds": dae.seconds}
    return out


def dae_section(report: dict, dae: DaEResult, plan: DemoPlan, layers: dict[str, int]) -> str:
    name, nxt = report["member"], report["next_member"]
    params, change = report["parameters"], report["change"]
    depth = layers[name] + plan.dae_blocks
    removed = 1 - report["added_compressed"] / report["added"]
    rows = [
        (f"{name} before expansion", layers[name], params["before"], report["loss"]["before"], ""),
        (f"{name} + {plan.dae_blocks} zero blocks", depth, params["expanded"], report["loss"]["expanded"],
         _ci(change["expanded"], sign=True)),
        (f"{name} after DaE training", depth, params["expanded"], report["loss"]["trained"],
         _ci(change["trained"], sign=True)),
        (f"{name} after SVD-LLM v2", depth, params["compressed"], report["loss"]["compressed"],
         _ci(change["compressed"], sign=True)),
        (f"{name} after {plan.heal_steps} healing steps", depth, params["compressed"],
         report["loss"]["healed"], _ci(change["healed"], sign=True)),
        (f"{nxt} (next member)", layers[nxt], None, report["next_member_loss"], ""),
    ]
    lines = [
        (f"\nDaE on the smallest member ({name}): {plan.dae_blocks} blocks appended (o_proj and "
        f"down_proj zero, q/k/v/gate/up Gaussian); {plan.dae_steps} steps trained only them, the "
        f"head and the final norm ({report['trainable'] / 1e6:.2f}M parameters); SVD-LLM v2 then "
        f"removed {removed:.0%} of the added blocks' {report['added'] / 1e6:.2f}M parameters, and "
        f"{plan.heal_steps} steps trained the thin matrices that replace them ({dae.seconds:.0f}s in all)"),
        f"{'state':<28} {'layers':>6} {'params':>8}  {'loss':<22}  change vs before expansion"]
    for label, depth_, count, loss, delta in rows:
        shown = f"{count / 1e6:.2f}M" if count else ""
        lines.append(f"{label:<28} {depth_:>6} {shown:>8}  {_ci(loss):<22}  {delta}")
    change = report["change"]["trained"]
    kept = report["gain_kept"]
    lowered = change["high"] < 0
    lines.append(f"DaE lowered {name}'s loss (interval entirely below zero): "
                 f"{_verdict(lowered)} ({change['value']:+.3f} nats)")
    lines.append("compression kept at least 90% of the gain: "
                 + (f"{_verdict(kept['value'] >= 0.9)} (kept {_ci(kept, percent=True)}; before "
                    f"healing {_ci(report['gain_kept_unhealed'], percent=True)})" if lowered
                    else "- (no gain to keep)"))
    return "\n".join(lines)


def samples(model: FamilyModel, dae: DaEResult, tokenizer, names: list[str], plan: DemoPlan,
            seed: int, prompts: list[str], run_dir: Path) -> Path:
    """Print the first prompt's samples side by side; write every prompt's to samples.md."""
    params = SamplingParams(max_new_tokens=plan.sample_tokens, temperature=0.7, top_k=40, seed=seed)
    models = {name: (model, e) for name, e in zip(names, model.config.exits)}
    models[f"{dae.member} + DaE, compressed"] = (dae.healed, dae.exit)
    results = [(prompt, sample_members(models, tokenizer, prompt, params)) for prompt in prompts]
    settings = (f"Same prompt and seed ({seed}) for every member; temperature 0.7, top-k 40, "
                f"{plan.sample_tokens} new tokens.")
    print(f"\nsamples, prompt {prompts[0]!r} ({settings[:-1].lower()}):")
    print(columns(prompts[0], results[0][1]))
    return write_markdown(run_dir / "samples.md", settings, results)
