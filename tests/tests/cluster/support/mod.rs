//! What the cluster tests stand on: the cluster script (`script`), a tap
//! that consumes through reconnections (`tap`), the paced publisher and the
//! clicker (`load`), and the figures read from what they saw (`figures`).

mod figures;
mod load;
mod script;
mod tap;

pub use figures::{env_or, longest_gap, longest_gap_in, longest_time_gap};
pub use load::{Clicks, Published, click_links, publish_paced};
pub use script::{cluster, connected_port, connections_made, leader};
pub use tap::{Seen, lock, run_tap};
