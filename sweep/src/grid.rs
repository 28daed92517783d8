//! Parameter grids and CSV rows into jobs' parameter sets.
//!
//! `--grid seed=1..100` is the integers 1 to 100 (both ends included), `--grid cfg=4..8:0.5` steps by
//! 0.5, `--grid sampler=euler,dpmpp_2m` lists values; several grids multiply (the first varies
//! slowest, as nested loops written in that order). `--rows FILE` adds one job per CSV row (the header
//! names the parameters); with grids too, every row is combined with every grid point. Values stay
//! text: they are applied as `--set` applies them, so the graph's parameter types decide.

use std::path::Path;

/// A problem with the sweep's arguments, naming the argument.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum SweepError {
    #[error("--grid {arg:?}: {why}")]
    Grid { arg: String, why: String },
    #[error("--rows {file}: {why}")]
    Rows { file: String, why: String },
    #[error("the sweep has {0} jobs; at most {MAX_JOBS} are allowed (split it)")]
    TooMany(u128),
}

/// More jobs than anyone renders is a typo (`1..10000000`), refused before anything is queued.
pub const MAX_JOBS: u128 = 1_000_000;

/// One `--grid name=values`.
#[derive(Clone, Debug, PartialEq)]
pub struct Grid {
    pub name: String,
    pub values: Vec<String>,
}

impl Grid {
    /// Parses `name=a..b`, `name=a..b:step` or `name=v1,v2,…`.
    pub fn parse(arg: &str) -> Result<Grid, SweepError> {
        let fail = |why: &str| SweepError::Grid { arg: arg.to_owned(), why: why.to_owned() };
        let (name, spec) = arg.split_once('=').ok_or_else(|| fail("expected NAME=VALUES (1..10, 1..2:0.25 or a,b,c)"))?;
        let name = name.trim();
        if name.is_empty() {
            return Err(fail("the parameter name is empty"));
        }
        let values = match range(spec) {
            Some(r) => r.map_err(|why| fail(&why))?,
            None => spec.split(',').map(str::to_owned).collect(),
        };
        if values.is_empty() || values.iter().any(String::is_empty) && spec.contains(',') {
            return Err(fail("a value is empty"));
        }
        Ok(Grid { name: name.to_owned(), values })
    }
}

/// `a..b` or `a..b:step` as values, or None when `spec` is not a range.
fn range(spec: &str) -> Option<Result<Vec<String>, String>> {
    let (bounds, step) = match spec.split_once(':') {
        Some((b, s)) => (b, Some(s)),
        None => (spec, None),
    };
    let (a, b) = bounds.split_once("..")?;
    let (a, b) = (a.trim(), b.trim());
    // Integers (seeds up to 2^64 − 1) stay exact; anything else is a float range.
    if let (Ok(a), Ok(b), None) = (a.parse::<i128>(), b.parse::<i128>(), step) {
        if b < a {
            return Some(Err(format!("the range ends ({b}) before it starts ({a})")));
        }
        if (b - a) as u128 >= MAX_JOBS {
            return Some(Err(format!("{} values are too many", b - a + 1)));
        }
        return Some(Ok((a..=b).map(|v| v.to_string()).collect()));
    }
    let num = |s: &str| s.trim().parse::<f64>().ok().filter(|v| v.is_finite());
    let (Some(a), Some(b)) = (num(a), num(b)) else { return Some(Err("a range's ends must be numbers".into())) };
    let step = match step {
        Some(s) => match num(s) {
            Some(s) if s > 0.0 => s,
            _ => return Some(Err("the step must be a positive number".into())),
        },
        None => 1.0,
    };
    if b < a {
        return Some(Err(format!("the range ends ({b}) before it starts ({a})")));
    }
    let n = ((b - a) / step + 1e-9).floor() as u128 + 1;
    if n > MAX_JOBS {
        return Some(Err(format!("{n} values are too many")));
    }
    // Integer steps from integer starts print as integers (an INT parameter takes them).
    let ints = a.fract() == 0.0 && step.fract() == 0.0;
    Some(Ok((0..n as u64)
        .map(|i| {
            let v = a + step * i as f64;
            if ints {
                format!("{}", v as i128)
            } else {
                // Rounded to the step's decimals, so 0.1 steps give 0.3, not 0.30000000000000004.
                let decimals = decimals(step).max(decimals(a));
                format!("{v:.decimals$}")
            }
        })
        .collect()))
}

/// Decimal places a number needs (up to 12).
fn decimals(v: f64) -> usize {
    (0..12).find(|&d| (v * 10f64.powi(d as i32)).fract().abs() < 1e-9).unwrap_or(12)
}

/// Reads CSV rows: the header names the parameters, each row is one parameter set.
pub fn read_rows(file: &Path) -> Result<Vec<Vec<(String, String)>>, SweepError> {
    let fail = |why: String| SweepError::Rows { file: file.display().to_string(), why };
    let mut reader = csv::ReaderBuilder::new().trim(csv::Trim::Headers).from_path(file).map_err(|e| fail(e.to_string()))?;
    let header: Vec<String> = reader.headers().map_err(|e| fail(e.to_string()))?.iter().map(str::to_owned).collect();
    if header.is_empty() || header.iter().any(String::is_empty) {
        return Err(fail("the header must name every column".into()));
    }
    let mut rows = Vec::new();
    for (i, record) in reader.records().enumerate() {
        let record = record.map_err(|e| fail(format!("row {}: {e}", i + 2)))?;
        rows.push(header.iter().cloned().zip(record.iter().map(str::to_owned)).collect());
    }
    Ok(rows)
}

/// Every job's parameter set: each row (or one empty row without `--rows`) combined with every point
/// of the grids' product, in order.
pub fn expand(grids: &[Grid], rows: Option<Vec<Vec<(String, String)>>>) -> Result<Vec<Vec<(String, String)>>, SweepError> {
    let rows = rows.unwrap_or_else(|| vec![Vec::new()]);
    let count = grids.iter().fold(rows.len() as u128, |n, g| n.saturating_mul(g.values.len() as u128));
    if count > MAX_JOBS {
        return Err(SweepError::TooMany(count));
    }
    let mut jobs = Vec::with_capacity(count as usize);
    for row in rows {
        let mut points: Vec<Vec<(String, String)>> = vec![row];
        for g in grids {
            points = points.into_iter().flat_map(|p| g.values.iter().map(move |v| [p.clone(), vec![(g.name.clone(), v.clone())]].concat())).collect();
        }
        jobs.extend(points);
    }
    Ok(jobs)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn values(arg: &str) -> Vec<String> {
        Grid::parse(arg).unwrap().values
    }

    #[test]
    fn grids_parse_ranges_steps_and_lists() {
        assert_eq!(values("seed=1..4"), ["1", "2", "3", "4"]);
        assert_eq!(values("seed=18446744073709551614..18446744073709551615"), ["18446744073709551614", "18446744073709551615"]);
        assert_eq!(values("cfg=4..6:0.5"), ["4.0", "4.5", "5.0", "5.5", "6.0"]);
        assert_eq!(values("denoise=0.1..0.3:0.1"), ["0.1", "0.2", "0.3"]);
        assert_eq!(values("steps=10..30:10"), ["10", "20", "30"]);
        assert_eq!(values("sampler=euler,dpmpp_2m"), ["euler", "dpmpp_2m"]);
        assert_eq!(values("prompt=a cat"), ["a cat"]);
        for bad in ["seed", "=1..2", "seed=5..1", "cfg=1..2:0", "cfg=a..b", "s=a,,b", "seed=0..99999999"] {
            assert!(matches!(Grid::parse(bad), Err(SweepError::Grid { .. })), "{bad}");
        }
    }

    #[test]
    fn grids_multiply_and_rows_combine() {
        let g = [Grid::parse("a=1..2").unwrap(), Grid::parse("b=x,y,z").unwrap()];
        let jobs = expand(&g, None).unwrap();
        assert_eq!(jobs.len(), 6);
        assert_eq!(jobs[0], [("a".to_owned(), "1".to_owned()), ("b".to_owned(), "x".to_owned())]);
        assert_eq!(jobs[5], [("a".to_owned(), "2".to_owned()), ("b".to_owned(), "z".to_owned())]);
        let d = tempfile::tempdir().unwrap();
        let f = d.path().join("rows.csv");
        std::fs::write(&f, "prompt, seed\n\"a cat, sitting\",1\na dog,2\n").unwrap();
        let rows = read_rows(&f).unwrap();
        assert_eq!(rows[0], [("prompt".to_owned(), "a cat, sitting".to_owned()), ("seed".to_owned(), "1".to_owned())]);
        let jobs = expand(&g[1..], Some(rows)).unwrap();
        assert_eq!(jobs.len(), 6);
        assert_eq!(jobs[3], [("prompt".to_owned(), "a dog".to_owned()), ("seed".to_owned(), "2".to_owned()), ("b".to_owned(), "x".to_owned())]);
        let many = [Grid::parse("a=1..1000").unwrap(), Grid::parse("b=1..1000").unwrap(), Grid::parse("c=1,2").unwrap()];
        assert_eq!(expand(&many, None), Err(SweepError::TooMany(2_000_000)));
        std::fs::write(&f, "prompt,seed\na,1,extra\n").unwrap();
        assert!(matches!(read_rows(&f), Err(SweepError::Rows { .. })));
    }
}
