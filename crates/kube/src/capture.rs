//! Transparent capture: the iptables rules `trellis proxy-init` installs in a Pod's network
//! namespace (as istio-init does), so the app's traffic goes through its proxy with no change to
//! the app.
//!
//! - inbound: TCP arriving at the Pod goes to the proxy's inbound port, except excluded ports
//!   (the proxy's admin port, which the kubelet probes);
//! - outbound: TCP the Pod sends goes to the proxy's outbound port, except the proxy's own
//!   connections (its UID and GID: no loop), connections to 127.0.0.1 (the app talking to
//!   itself), and excluded ports and CIDRs.
//!
//! The rules are one `iptables-restore` input, applied atomically.

/// What to capture.
#[derive(Clone, Debug)]
pub struct CaptureRules {
    pub proxy_uid: u32,
    pub proxy_gid: u32,
    pub inbound_port: u16,
    pub outbound_port: u16,
    pub exclude_inbound_ports: Vec<u16>,
    pub exclude_outbound_ports: Vec<u16>,
    pub exclude_outbound_cidrs: Vec<String>,
}

impl CaptureRules {
    /// The `iptables-restore` input for the nat table.
    pub fn restore_input(&self) -> String {
        let mut r = vec![
            "*nat".to_string(),
            ":TRELLIS_INBOUND - [0:0]".into(),
            ":TRELLIS_IN_REDIRECT - [0:0]".into(),
            ":TRELLIS_OUTPUT - [0:0]".into(),
            ":TRELLIS_REDIRECT - [0:0]".into(),
            format!("-A TRELLIS_IN_REDIRECT -p tcp -j REDIRECT --to-ports {}", self.inbound_port),
            format!("-A TRELLIS_REDIRECT -p tcp -j REDIRECT --to-ports {}", self.outbound_port),
            "-A PREROUTING -p tcp -j TRELLIS_INBOUND".into(),
        ];
        let mut excluded_in = self.exclude_inbound_ports.clone();
        excluded_in.sort_unstable();
        excluded_in.dedup();
        for p in excluded_in {
            r.push(format!("-A TRELLIS_INBOUND -p tcp --dport {p} -j RETURN"));
        }
        r.push("-A TRELLIS_INBOUND -p tcp -j TRELLIS_IN_REDIRECT".into());
        r.push("-A OUTPUT -p tcp -j TRELLIS_OUTPUT".into());
        r.push(format!("-A TRELLIS_OUTPUT -m owner --uid-owner {} -j RETURN", self.proxy_uid));
        r.push(format!("-A TRELLIS_OUTPUT -m owner --gid-owner {} -j RETURN", self.proxy_gid));
        r.push("-A TRELLIS_OUTPUT -d 127.0.0.1/32 -j RETURN".into());
        for p in &self.exclude_outbound_ports {
            r.push(format!("-A TRELLIS_OUTPUT -p tcp --dport {p} -j RETURN"));
        }
        for c in &self.exclude_outbound_cidrs {
            r.push(format!("-A TRELLIS_OUTPUT -d {c} -j RETURN"));
        }
        r.push("-A TRELLIS_OUTPUT -j TRELLIS_REDIRECT".into());
        r.push("COMMIT".into());
        r.join("\n") + "\n"
    }
}

/// Parses a CIDR (`10.0.0.0/8`, or an address) so a bad exclusion fails before any rule is set.
pub fn check_cidr(s: &str) -> Result<(), String> {
    let (ip, len) = s.split_once('/').unwrap_or((s, "32"));
    let ip: std::net::IpAddr = ip.parse().map_err(|_| format!("bad CIDR {s:?}: {ip:?} is not an IP address"))?;
    let max = if ip.is_ipv4() { 32 } else { 128 };
    match len.parse::<u8>() {
        Ok(l) if l <= max => Ok(()),
        _ => Err(format!("bad CIDR {s:?}: prefix length must be 0–{max}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_proxy_and_excluded_traffic_return_before_the_redirect() {
        let rules = CaptureRules {
            proxy_uid: 1337,
            proxy_gid: 1337,
            inbound_port: 15006,
            outbound_port: 15001,
            exclude_inbound_ports: vec![15021],
            exclude_outbound_ports: vec![5432],
            exclude_outbound_cidrs: vec!["169.254.169.254/32".into()],
        }
        .restore_input();
        let lines: Vec<&str> = rules.lines().collect();
        let pos =
            |needle: &str| lines.iter().position(|l| l.contains(needle)).unwrap_or_else(|| panic!("{needle}: {rules}"));
        let redirect = pos("-A TRELLIS_OUTPUT -j TRELLIS_REDIRECT");
        assert!(pos("--uid-owner 1337 -j RETURN") < redirect);
        assert!(pos("--dport 5432 -j RETURN") < redirect);
        assert!(pos("-d 169.254.169.254/32 -j RETURN") < redirect);
        assert!(
            pos("TRELLIS_INBOUND -p tcp --dport 15021 -j RETURN")
                < pos("-A TRELLIS_INBOUND -p tcp -j TRELLIS_IN_REDIRECT")
        );
        assert!(rules.contains("REDIRECT --to-ports 15006") && rules.contains("REDIRECT --to-ports 15001"));
        assert_eq!(lines.last(), Some(&"COMMIT"));
    }

    #[test]
    fn cidrs_are_checked() {
        assert!(check_cidr("10.0.0.0/8").is_ok());
        assert!(check_cidr("10.0.0.1").is_ok());
        assert!(check_cidr("10.0.0.0/33").is_err());
        assert!(check_cidr("nope/8").is_err());
    }
}
