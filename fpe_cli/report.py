"""Rich tables for the expand/params/inspect/verify/convert reports (rendering only, no math)."""

from __future__ import annotations

import re

from rich.console import Console
from rich.markup import escape
from rich.table import Table
from rich.text import Text


CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")  # terminal control characters (ANSI escapes), not \t \n


def markup_safe(value):
    """A report document with every string escaped for rich markup: file names, tensor names and metadata
    come from users (`run[lr=0.1].safetensors` would print as `run.safetensors`, and `[/]` would raise);
    control characters are shown escaped (`\\x1b`) so that metadata cannot drive the terminal."""
    if isinstance(value, str):
        shown = CONTROL.sub(lambda m: m.group().encode("unicode_escape").decode(), value)
        return escape(shown + " ")[:-1]  # rich doubles a trailing backslash (for gluing markup after it): not here
    if isinstance(value, dict):  # keys too: metadata keys are the user's (fpe's own keys are plain words)
        return {markup_safe(k) if isinstance(k, str) else k: markup_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [markup_safe(v) for v in value]
    return value


def print_table(console: Console, table: Table) -> None:
    """A table as is when it fits the console; otherwise one line per row (`first: header value; ...`)
    that the terminal wraps at spaces. Rich would squeeze the columns into the width and cut numbers
    to `2,097,1…` or drop a column whole, and a printed number must never be cut."""
    natural = console.measure(table, options=console.options.update(max_width=1 << 16)).maximum
    if natural <= console.width:
        console.print(table)
        return
    if table.title:
        console.print(table.title, highlight=False, soft_wrap=False)
    headers = [_plain(c.header) for c in table.columns]
    columns = [[_plain(cell) for cell in c.cells] for c in table.columns]
    for row in zip(*columns):
        fields = "; ".join(f"{h} {v}" for h, v in zip(headers[1:], row[1:]) if v)
        console.print(f"{headers[0]} {row[0]}: {fields}" if row[0] else fields, highlight=False, markup=False)


def _plain(cell) -> str:
    """A cell's text without its markup."""
    if isinstance(cell, Text):
        return cell.plain
    return Text.from_markup(cell).plain if isinstance(cell, str) else str(cell)


def _fmt_int(n) -> str:
    return f"{n:,}" if isinstance(n, int) else "-" if n is None else str(n)


def _shape(s) -> str:
    return "x".join(str(v) for v in s)


def render_expand(doc: dict, console: Console) -> None:
    doc = markup_safe(doc)
    table = Table(title=f"fpe expand: {doc['input']} -> {doc['output']}", title_justify="left")
    for col in ("layer", "shape", "split", "alpha", "weights before", "widened", "pruned", "weights after"):
        table.add_column(col, justify="right" if col not in ("layer", "split") else "left")
    for row in doc["layers"]:  # widened: after splitting rows and copying columns, before the budget pruning
        table.add_row(row["weight"], f"{_shape(row['shape_before'])} -> {_shape(row['shape_after'])}",
                      row["split"] or "-", _fmt_int(row["alpha"]), _fmt_int(row["weights_before"]),
                      _fmt_int(row["weights_widened"]), _fmt_int(row["pruned"]), _fmt_int(row["weights_after"]))
    print_table(console, table)
    holds = "[green]holds[/]" if doc["budget_holds"] else "[red]VIOLATED[/]"
    console.print(f"hidden widths {doc['hidden_widths_before']} -> {doc['hidden_widths_after']}; "
                  f"weights {doc['weights_after']:,} / budget {doc['budget']:,} ({holds})")
    dead = [f"{row['weight']}: {row['rows_without_edges']}" for row in doc["layers"] if row.get("rows_without_edges")]
    if dead:  # never silent: pruning can take every edge of a child (it then outputs only its bias)
        console.print(f"[yellow]note:[/] rows left without input edges by the budget pruning: {', '.join(dead)}")
    d = doc["drift"]
    if d is None:
        console.print("function drift not measured (--probe-samples 0). FPE changes the function: "
                      "fine-tune before use (fpe finetune).")
    else:
        agree = d["argmax_agreement"]
        agree = "n/a" if agree is None or agree != agree else f"{agree:.1%}"  # None (JSON) or NaN: one output
        console.print(f"function drift on {d['probe']}: relative L2 {d['relative_l2']:.3f}, "
                      f"argmax agreement {agree}. FPE changes the function: fine-tune before use (fpe finetune).")
    if doc.get("dropped_tensors"):
        console.print(f"[yellow]note:[/] not part of the MLP chain, so not written: {', '.join(doc['dropped_tensors'])}")
    if doc.get("activation_source") == "default":
        console.print("[yellow]note:[/] the file records no activation; relu assumed (set --activation)")
    console.print(f"wrote {doc['output']} ({doc['layout']} layout, {doc['output_bytes']:,} bytes; "
                  f"input {doc['input_bytes']:,} bytes)" + (f"; plan {doc['plan_saved_to']}" if doc["plan_saved_to"] else ""))


def render_params(doc: dict, console: Console) -> None:
    doc = markup_safe(doc)
    table = Table(title=f"fpe params: {doc['model']} ({doc['layout']} layout)", title_justify="left")
    for col in ("layer", "shape", "dtype", "stored", "weights", "non-zero", "biases", "sparsity", "bytes"):
        table.add_column(col, justify="left" if col in ("layer", "dtype") else "right")
    for r in doc["layers"]:
        table.add_row(r["weight"], _shape(r["shape"]), r["dtype"], _fmt_int(r["stored_elements"]), _fmt_int(r["weights"]),
                      _fmt_int(r["nonzero_weights"]), _fmt_int(r["biases"]), f"{r['sparsity']:.1%}", _fmt_int(r["bytes_on_disk"]))
    t = doc["total"]
    table.add_row("total", "", "", _fmt_int(t["stored_elements"]), _fmt_int(t["weights"]), _fmt_int(t["nonzero_weights"]),
                  _fmt_int(t["biases"]), "", _fmt_int(t["bytes_on_disk"]), style="bold")
    print_table(console, table)
    console.print(f"hidden neurons: {t['hidden_neurons']:,}; file: {doc['file_bytes']:,} bytes")
    tied = [r["weight"] for r in doc["layers"] if r.get("tied")]
    if tied:
        console.print(f"tied columns (each copy group is one weight, counted once): {', '.join(tied)}")
    if "source" in doc:
        holds = "[green]holds[/]" if doc["budget_holds"] else "[red]VIOLATED[/]"
        console.print(f"source: {_fmt_int(doc['source']['weights'])} weights, {_fmt_int(doc['source']['biases'])} biases; "
                      f"budget {holds}")


def render_inspect(doc: dict, console: Console) -> None:
    doc = markup_safe(doc)
    console.print(f"[bold]{doc['model']}[/]: {doc['layout']} layout, {doc['file_bytes']:,} bytes, sha256 {doc['sha256'][:16]}...")
    console.print(f"widths {' -> '.join(map(str, doc['widths']))}, activation {doc['activation']} ({doc['activation_source']})"
                  + (", expanded" if doc["expanded"] else ""))
    chain = Table(title="chain", title_justify="left")
    for col in ("weight", "bias", "shape", "dtype", "mask", "lineage", "tied columns"):
        chain.add_column(col)
    for r in doc["chain"]:
        chain.add_row(r["weight"], r["bias"] or "-", _shape(r["shape"]), r["dtype"], "yes" if r["mask"] else "no",
                      "yes" if r["lineage"] else "no", "yes" if r["tied"] else "no")
    print_table(console, chain)
    tensors = Table(title="tensors", title_justify="left")
    for col in ("name", "dtype", "shape"):
        tensors.add_column(col)
    for r in doc["tensors"]:
        tensors.add_row(r["name"], r["dtype"], _shape(r["shape"]) or "scalar")
    print_table(console, tensors)
    if doc["unused_tensors"]:
        console.print(f"[yellow]not part of the chain:[/] {', '.join(doc['unused_tensors'])}")
    for k, v in sorted(doc["metadata"].items()):
        console.print(f"  {k}: {_shortened(v)}", highlight=False, soft_wrap=True)


SHOWN_METADATA = 300  # characters of a metadata value the table view shows (a serialized config can be MBs)


def _shortened(value) -> str:
    text = str(value)
    if len(text) <= SHOWN_METADATA:
        return text
    return f"{text[:SHOWN_METADATA]}... ({len(text):,} characters; --json shows all)"


def render_verify(doc: dict, console: Console) -> None:
    doc = markup_safe(doc)
    if not doc["has_masks"]:
        console.print(f"{doc['model']}: no masks, nothing FPE-specific to verify (weights are finite)")
        return
    console.print(f"[green]OK[/] {doc['model']}: " + "; ".join(doc["checks"]))


def render_convert(doc: dict, console: Console) -> None:
    doc = markup_safe(doc)
    console.print(f"wrote {doc['output']} ({doc['from_layout']} -> {doc['to_layout']}, "
                  f"{doc['input_bytes']:,} -> {doc['output_bytes']:,} bytes)")
