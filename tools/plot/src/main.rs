//! `rbdback-plot`: bench output in, PNG charts out.
//!
//! Reads what `tools/bench-engines` or `tools/bench-e2e` printed: sections that start with
//! `== <workload>`, a header line, then one line per client (`<name>  <IOPS> <MiB/s> <latency>
//! <CPU us per I/O> ...`; lines starting with `#` are comments). Draws, per file, two bar
//! charts side by side in one PNG: IOPS and CPU per I/O of every client relative to the
//! section's first client (fio's rbd engine, the anchor), with the absolute figure under each
//! bar's ratio. Text is drawn with a TrueType font from a file (Debian's fonts-dejavu-core by
//! default; `RBDBACK_PLOT_FONT` overrides), so nothing depends on the system's font setup.
//!
//! Usage: `rbdback-plot <bench output> <out.png> <title>`

use std::error::Error;

use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};
use plotters::style::{register_font, FontStyle};

const FONT: &str = "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf";

/// One client's figures in one workload.
#[derive(Debug, Clone)]
struct Row {
    client: String,
    iops: f64,
    cpu: f64,
}

/// One workload and its clients.
#[derive(Debug, Clone)]
struct Section {
    title: String,
    rows: Vec<Row>,
}

/// The numbers at the start of `s` (a trailing `x`, `p50` or `mean` ends a number or is
/// skipped).
fn numbers(s: &str) -> Vec<f64> {
    s.split_whitespace()
        .filter_map(|t| t.trim_end_matches('x').parse::<f64>().ok())
        .collect()
}

fn parse(text: &str) -> Result<Vec<Section>, String> {
    let mut out: Vec<Section> = Vec::new();
    for (n, line) in text.lines().enumerate() {
        if line.starts_with('#') || line.trim().is_empty() {
            continue;
        }
        if let Some(t) = line.strip_prefix("== ") {
            out.push(Section {
                title: t.split(" (").next().unwrap_or(t).trim().to_owned(),
                rows: Vec::new(),
            });
            continue;
        }
        // a client line: its name, then two or more spaces, then figures
        let Some(at) = line.find("  ") else { continue };
        let (name, rest) = line.split_at(at);
        let v = numbers(rest);
        if name.trim().is_empty()
            || v.len() < 4
            || !rest.trim_start().starts_with(|c: char| c.is_ascii_digit())
        {
            continue; // a header or a remark
        }
        let sec = out
            .last_mut()
            .ok_or_else(|| format!("line {}: a client before any '== workload' line", n + 1))?;
        sec.rows.push(Row {
            client: name.trim().to_owned(),
            iops: v[0],
            cpu: v[3],
        });
    }
    out.retain(|s| !s.rows.is_empty());
    if out.is_empty() {
        return Err("no '== workload' section with client lines".into());
    }
    Ok(out)
}

const COLORS: [RGBColor; 5] = [
    RGBColor(0x88, 0x88, 0x88),
    RGBColor(0xc8, 0xa0, 0x50),
    RGBColor(0x1f, 0x6f, 0xb4),
    RGBColor(0x6a, 0xb0, 0xe0),
    RGBColor(0x9a, 0x5a, 0xb0),
];

fn chart(
    area: &DrawingArea<BitMapBackend<'_>, plotters::coord::Shift>,
    sections: &[Section],
    clients: &[String],
    what: &str,
    value: fn(&Row) -> f64,
) -> Result<(), Box<dyn Error>> {
    let ratio = |s: &Section, r: &Row| {
        let base = s.rows.first().map_or(1.0, value);
        if base > 0.0 {
            value(r) / base
        } else {
            0.0
        }
    };
    let top = sections
        .iter()
        .flat_map(|s| s.rows.iter().map(move |r| ratio(s, r)))
        .fold(1.0f64, f64::max)
        * 1.45;
    let n = clients.len() as f64;
    let mut c = ChartBuilder::on(area)
        .caption(
            format!("{what} relative to {}", clients[0]),
            ("sans-serif", 22),
        )
        .margin(12)
        .x_label_area_size(46)
        .y_label_area_size(52)
        .build_cartesian_2d(0f64..sections.len() as f64, 0f64..top)?;
    c.configure_mesh()
        .disable_x_mesh()
        .light_line_style(TRANSPARENT)
        .x_labels(sections.len() * 2 + 1)
        .x_label_formatter(&|x| {
            let i = x.floor() as usize;
            if (x - x.floor() - 0.5).abs() < 0.01 {
                sections.get(i).map_or(String::new(), |s| s.title.clone())
            } else {
                String::new()
            }
        })
        .x_label_style(("sans-serif", 13))
        .y_desc(format!("{what} / {}", clients[0]))
        .y_label_formatter(&|y| format!("{y:.1}x"))
        .label_style(("sans-serif", 14))
        .draw()?;
    // the anchor's level
    c.draw_series(LineSeries::new(
        [(0.0, 1.0), (sections.len() as f64, 1.0)],
        BLACK.mix(0.5).stroke_width(1),
    ))?;
    let w = 0.8 / n;
    for (ci, client) in clients.iter().enumerate() {
        let color = COLORS[ci % COLORS.len()];
        let mut bars = Vec::new();
        let mut labels = Vec::new();
        for (si, s) in sections.iter().enumerate() {
            let Some(r) = s.rows.iter().find(|r| &r.client == client) else {
                continue;
            };
            let v = ratio(s, r);
            let x0 = si as f64 + 0.1 + ci as f64 * w;
            bars.push(Rectangle::new(
                [(x0, 0.0), (x0 + w * 0.92, v)],
                color.filled(),
            ));
            let abs = value(r);
            let abs = if abs < 100.0 {
                format!("{abs:.1}")
            } else {
                format!("{abs:.0}")
            };
            labels.push((x0 + w * 0.46, v, format!("{v:.2}x"), abs));
        }
        c.draw_series(bars)?
            .label(client.clone())
            .legend(move |(x, y)| Rectangle::new([(x, y - 6), (x + 14, y + 6)], color.filled()));
        // the ratio, and under it the absolute figure, centred above each bar
        let above = ("sans-serif", 11)
            .into_font()
            .color(&BLACK)
            .pos(Pos::new(HPos::Center, VPos::Bottom));
        let grey = BLACK.mix(0.6);
        let under = above.color(&grey);
        c.draw_series(labels.into_iter().map(|(x, y, ratio_text, abs)| {
            EmptyElement::at((x, y))
                + Text::new(ratio_text, (0, -16), above.clone())
                + Text::new(abs, (0, -3), under.clone())
        }))?;
    }
    c.configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .background_style(WHITE.mix(0.9))
        .border_style(BLACK.mix(0.3))
        .label_font(("sans-serif", 13))
        .draw()?;
    Ok(())
}

fn run(input: &str, output: &str, title: &str) -> Result<(), Box<dyn Error>> {
    let font_path = std::env::var("RBDBACK_PLOT_FONT").unwrap_or_else(|_| FONT.to_owned());
    let font = std::fs::read(&font_path).map_err(|e| {
        format!("font {font_path}: {e} (install fonts-dejavu-core: tools/install-deps)")
    })?;
    register_font(
        "sans-serif",
        FontStyle::Normal,
        Box::leak(font.into_boxed_slice()),
    )
    .map_err(|_| format!("font {font_path}: not a TrueType font"))?;
    let text = std::fs::read_to_string(input).map_err(|e| format!("{input}: {e}"))?;
    let sections = parse(&text).map_err(|e| format!("{input}: {e}"))?;
    let mut clients: Vec<String> = Vec::new();
    for s in &sections {
        for r in &s.rows {
            if !clients.contains(&r.client) {
                clients.push(r.client.clone());
            }
        }
    }
    let width = (360 + 170 * sections.len() as u32).clamp(900, 1800);
    let root = BitMapBackend::new(output, (width, 980)).into_drawing_area();
    root.fill(&WHITE)?;
    let (head, body) = root.split_vertically(44);
    head.draw_text(
        title,
        &("sans-serif", 22).into_font().color(&BLACK),
        (14, 12),
    )?;
    let (upper, lower) = body.split_vertically(468);
    chart(&upper, &sections, &clients, "IOPS", |r| r.iops)?;
    chart(&lower, &sections, &clients, "CPU per I/O (us)", |r| r.cpu)?;
    root.present()?;
    Ok(())
}

fn main() -> std::process::ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [input, output, title] = args.as_slice() else {
        eprintln!("usage: rbdback-plot <bench output> <out.png> <title>");
        return std::process::ExitCode::from(2);
    };
    match run(input, output, title) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("rbdback-plot: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn both_bench_formats_parse() {
        let engines = "== randread 4k queue depth 32 (10 s each)\n\
            \x20                          IOPS     MiB/s      lat us   CPU us/IO  IOPS/rbd\n\
            fio --ioengine=rbd         27366     106.9      1169.0        24.2     1.00x\n\
            rbdback direct             31460     122.9       996.0        16.9     1.15x\n";
        let s = parse(engines).unwrap();
        assert_eq!(s[0].title, "randread 4k queue depth 32");
        assert_eq!(s[0].rows[1].client, "rbdback direct");
        assert_eq!((s[0].rows[1].iops, s[0].rows[1].cpu), (31460.0, 16.9));
        let e2e = "== 4 KiB random read, queue depth 32 (256 MiB prefilled span)\n\
            \x20                                IOPS      MiB/s     lat (us)      CPU us/IO\n\
            fio --ioengine=rbd            26385.0      103.1  1212.5 mean           23.4\n\
            rbdback (ring + engine)       42739.0      166.9    714.0 p50           14.7\n\
            ratio rbdback/fio-rbd: IOPS 1.62x, CPU per I/O 0.63x\n";
        let s = parse(e2e).unwrap();
        assert_eq!(s[0].rows.len(), 2, "{s:?}");
        assert_eq!(s[0].rows[1].client, "rbdback (ring + engine)");
        assert_eq!(s[0].rows[1].cpu, 14.7);
        assert!(parse("nothing here\n").is_err());
    }
}
