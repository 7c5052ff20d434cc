//! The `--plot` of `shmgrpc bench`: latency percentiles against payload size, log axes, one line per series (SVG).

use std::path::Path;

use plotters::prelude::*;

/// Draws `series` (name, points of (size in bytes, latency in ms)) into an SVG file.
pub(crate) fn latency_svg(path: &Path, series: &[(String, Vec<(f64, f64)>)]) -> anyhow::Result<()> {
    let points = series.iter().flat_map(|(_, p)| p.iter());
    let (mut x0, mut x1, mut y0, mut y1) = (f64::MAX, f64::MIN, f64::MAX, f64::MIN);
    for &(x, y) in points {
        x0 = x0.min(x);
        x1 = x1.max(x);
        y0 = y0.min(y.max(1e-4));
        y1 = y1.max(y);
    }
    if x0 > x1 {
        anyhow::bail!("nothing to plot");
    }
    let root = SVGBackend::new(path, (960, 640)).into_drawing_area();
    root.fill(&WHITE)?;
    let mut chart = ChartBuilder::on(&root)
        .caption("shmgrpc bench: latency percentiles (median, p99, p99.9) against payload size", ("sans-serif", 22))
        .margin(16)
        .x_label_area_size(48)
        .y_label_area_size(72)
        .build_cartesian_2d((x0 / 1.5..x1 * 1.5).log_scale(), (y0 / 2.0..y1 * 2.0).log_scale())?;
    chart
        .configure_mesh()
        .x_desc("payload size (bytes)")
        .y_desc("latency (ms)")
        .x_label_formatter(&|v| bytesize::ByteSize(*v as u64).to_string())
        .y_label_formatter(&|v| match *v {
            v if v >= 1.0 => format!("{v:.0}"),
            v if v >= 0.01 => format!("{v:.2}"),
            v => format!("{v:.0e}"),
        })
        .draw()?;
    for (i, (name, pts)) in series.iter().enumerate() {
        let color = Palette99::pick(i).to_rgba();
        let pts: Vec<(f64, f64)> = pts.iter().map(|&(x, y)| (x, y.max(1e-4))).collect();
        chart
            .draw_series(LineSeries::new(pts.clone(), color.stroke_width(2)))?
            .label(name.clone())
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2)));
        chart.draw_series(pts.into_iter().map(|p| Circle::new(p, 3, color.filled())))?;
    }
    chart.configure_series_labels().position(SeriesLabelPosition::UpperLeft).border_style(BLACK).draw()?;
    root.present()?;
    Ok(())
}
