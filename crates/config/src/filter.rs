//! Istio `Telemetry` access-log filters: the CEL forms operators write on status codes.

/// An access-log filter: Istio's `filter.expression` (CEL) for the forms operators use on
/// status codes: `response.code >= 400`, `response.code == 503`, `!=`, `<`, `<=`, `>`,
/// joined by `&&` or `||` (`&&` binds tighter).
#[derive(Clone, Debug, PartialEq)]
pub struct Filter {
    any_of: Vec<Vec<(Op, u16)>>,
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Op {
    Eq,
    Ne,
    Lt,
    Le,
    Gt,
    Ge,
}

impl Filter {
    pub fn parse(expr: &str) -> Result<Filter, String> {
        let mut any_of = Vec::new();
        for alt in expr.split("||") {
            let mut all = Vec::new();
            for term in alt.split("&&") {
                let t = term.trim();
                let rest = t
                    .strip_prefix("response.code")
                    .ok_or_else(|| {
                        format!("unsupported filter term {t:?}: only comparisons of response.code are supported")
                    })?
                    .trim();
                let (op, num) =
                    [(">=", Op::Ge), ("<=", Op::Le), ("==", Op::Eq), ("!=", Op::Ne), (">", Op::Gt), ("<", Op::Lt)]
                        .iter()
                        .find_map(|(s, op)| rest.strip_prefix(s).map(|n| (*op, n.trim())))
                        .ok_or_else(|| format!("unsupported operator in {t:?}"))?;
                let n: u16 = num.parse().map_err(|_| format!("expected a status code in {t:?}"))?;
                all.push((op, n));
            }
            any_of.push(all);
        }
        Ok(Filter { any_of })
    }

    pub fn matches(&self, code: u16) -> bool {
        self.any_of.iter().any(|all| {
            all.iter().all(|(op, n)| match op {
                Op::Eq => code == *n,
                Op::Ne => code != *n,
                Op::Lt => code < *n,
                Op::Le => code <= *n,
                Op::Gt => code > *n,
                Op::Ge => code >= *n,
            })
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filters_on_status() {
        let f = Filter::parse("response.code >= 400 && response.code != 404 || response.code == 201").expect("parse");
        assert!(f.matches(500));
        assert!(!f.matches(404));
        assert!(f.matches(201));
        assert!(!f.matches(200));
        assert!(Filter::parse("request.path == '/x'").is_err());
    }
}
