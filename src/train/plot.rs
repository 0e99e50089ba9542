//! The PNG of a training run: loss (and the InfoNCE mutual-information bound) per epoch on the
//! left, the monitored held-out accuracies (kNN-1, probe with 10 labels per class) on the right,
//! with those of raw pixels as dashed reference lines.
//!
//! Text is drawn with DejaVu Sans, embedded through the `dejavu` crate (the fonts' licence is
//! the Bitstream Vera / DejaVu licence, free to embed; the crate is MIT or Apache-2.0), so
//! plotting needs no system font and downloads nothing.

use std::path::Path;
use std::sync::Once;

use plotters::coord::types::RangedCoordf64;
use plotters::prelude::*;
use plotters::style::FontStyle;

use super::trainer::MonitorPoint;
use crate::{Error, Result};

/// The family name every chart of the crate draws its text with (DejaVu Sans, registered by
/// [`register_font`]).
pub(crate) const FONT: &str = "sans-serif";

/// Registers the embedded DejaVu Sans as [`FONT`] (once per process).
pub(crate) fn register_font() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        // The bytes are a valid TTF; a failure would only mean text-less charts.
        let _ = plotters::style::register_font(FONT, FontStyle::Normal, dejavu::sans::regular());
    });
}

/// The grid and axis labels of a per-epoch panel.
fn draw_epoch_mesh<DB: DrawingBackend>(
    chart: &mut ChartContext<'_, DB, Cartesian2d<RangedCoordf64, RangedCoordf64>>,
) -> std::result::Result<(), String> {
    chart
        .configure_mesh()
        .x_desc("epoch")
        .x_label_formatter(&|x| format!("{x:.0}"))
        .label_style((FONT, 14))
        .axis_desc_style((FONT, 15))
        .draw()
        .map_err(|e| e.to_string())
}

/// The data of the curves.
#[derive(Clone, Debug, Default)]
pub struct Curves<'a> {
    /// Title above the charts (method, data set).
    pub title: &'a str,
    /// Mean loss of epochs 1, 2, ...
    pub loss: &'a [f64],
    /// `log N - loss` per epoch, for the InfoNCE losses.
    pub mi_bound: Option<&'a [f64]>,
    /// Accuracies on the monitor split.
    pub monitor: &'a [MonitorPoint],
    /// (kNN-1, probe with 10 labels per class) of raw pixels on the same split, drawn as dashed
    /// horizontal lines.
    pub raw: Option<(f64, f64)>,
}

fn range(values: impl Iterator<Item = f64>) -> (f64, f64) {
    let (lo, hi) = values
        .filter(|v| v.is_finite())
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), v| {
            (lo.min(v), hi.max(v))
        });
    if !lo.is_finite() {
        return (0.0, 1.0);
    }
    let pad = ((hi - lo) * 0.05).max(1e-3);
    (lo - pad, hi + pad)
}

/// Draws `curves` into a 1200 x 480 PNG at `path`.
pub fn plot_curves(path: impl AsRef<Path>, curves: &Curves<'_>) -> Result<()> {
    let path = path.as_ref();
    register_font();
    let err = |e: String| Error::format(path, format!("plotting: {e}"));
    let root = BitMapBackend::new(path, (1200, 480)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| err(e.to_string()))?;
    let root = root
        .titled(curves.title, (FONT, 22))
        .map_err(|e| err(e.to_string()))?;
    let (left, right) = root.split_horizontally(600);

    let epochs = curves.loss.len().max(1) as f64;
    let (lo, hi) = range(
        curves
            .loss
            .iter()
            .chain(curves.mi_bound.unwrap_or(&[]))
            .copied(),
    );
    let mut chart = ChartBuilder::on(&left)
        .caption("loss per epoch (nats)", (FONT, 18))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(55)
        .build_cartesian_2d(0.0..epochs, lo..hi)
        .map_err(|e| err(e.to_string()))?;
    draw_epoch_mesh(&mut chart).map_err(err)?;
    let loss_pts = curves
        .loss
        .iter()
        .enumerate()
        .map(|(i, &l)| ((i + 1) as f64, l));
    chart
        .draw_series(LineSeries::new(loss_pts, BLUE.stroke_width(2)))
        .map_err(|e| err(e.to_string()))?
        .label("loss")
        .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], BLUE.stroke_width(2)));
    if let Some(mi) = curves.mi_bound {
        let pts = mi.iter().enumerate().map(|(i, &l)| ((i + 1) as f64, l));
        chart
            .draw_series(LineSeries::new(pts, RED.stroke_width(2)))
            .map_err(|e| err(e.to_string()))?
            .label("MI bound log N - loss")
            .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], RED.stroke_width(2)));
    }
    chart
        .configure_series_labels()
        .label_font((FONT, 14))
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .position(SeriesLabelPosition::MiddleRight)
        .draw()
        .map_err(|e| err(e.to_string()))?;

    let acc = |f: fn(&MonitorPoint) -> f64| -> Vec<(f64, f64)> {
        curves
            .monitor
            .iter()
            .filter(|p| f(p).is_finite())
            .map(|p| (p.epoch as f64, f(p)))
            .collect()
    };
    let knn = acc(|p| p.knn1);
    let probe = acc(|p| p.probe_10_per_class);
    let raw: Vec<f64> = curves
        .raw
        .map_or(Vec::new(), |(a, b)| vec![a, b])
        .into_iter()
        .filter(|v| v.is_finite())
        .collect();
    let (alo, ahi) = range(
        knn.iter()
            .chain(&probe)
            .map(|p| p.1)
            .chain(raw.iter().copied())
            .chain([1.0]),
    );
    let mut chart = ChartBuilder::on(&right)
        .caption("held-out accuracy (monitor split)", (FONT, 18))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(55)
        // Room below the curves for the legend.
        .build_cartesian_2d(
            0.0..epochs,
            (alo - 0.6 * (ahi - alo)).max(0.0)..ahi.min(1.0),
        )
        .map_err(|e| err(e.to_string()))?;
    draw_epoch_mesh(&mut chart).map_err(err)?;
    let series = [
        ("kNN-1", knn, GREEN, curves.raw.map(|r| r.0)),
        (
            "probe, 10 labels/class",
            probe,
            MAGENTA,
            curves.raw.map(|r| r.1),
        ),
    ];
    for (name, pts, color, raw) in series {
        chart
            .draw_series(LineSeries::new(pts.clone(), color.stroke_width(2)))
            .map_err(|e| err(e.to_string()))?
            .label(format!("encoder {name}"))
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2))
            });
        chart
            .draw_series(pts.iter().map(|&p| Circle::new(p, 3, color.filled())))
            .map_err(|e| err(e.to_string()))?;
        if let Some(raw) = raw.filter(|v| v.is_finite()) {
            let dashes = (0..40).map(|i| {
                let x0 = epochs * i as f64 / 40.0;
                PathElement::new(
                    vec![(x0, raw), (x0 + epochs / 80.0, raw)],
                    color.stroke_width(1),
                )
            });
            chart
                .draw_series(dashes)
                .map_err(|e| err(e.to_string()))?
                .label(format!("raw pixels {name}"))
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 8, y)], color));
        }
    }
    chart
        .configure_series_labels()
        .label_font((FONT, 14))
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .position(SeriesLabelPosition::LowerRight)
        .draw()
        .map_err(|e| err(e.to_string()))?;
    root.present().map_err(|e| err(e.to_string()))?;
    Ok(())
}
