//! Unit tests of the argv rewriting rules.

use super::*;
use crate::vm::DiskDescription;

fn args(s: &str) -> Vec<String> {
    s.split_whitespace().map(str::to_string).collect()
}

fn disk(name: &str, node: &str, device: &str, file: &str) -> DiskDescription {
    DiskDescription {
        name: name.into(),
        node_name: node.into(),
        device: device.into(),
        file: file.into(),
        format: "qcow2".into(),
        size: 1 << 30,
        read_only: false,
    }
}

fn ctx(names: &[&str]) -> RewriteContext {
    RewriteContext {
        binary: "qemu-system-x86_64".into(),
        dir: PathBuf::from("/st/m1"),
        images: names
            .iter()
            .map(|n| (n.to_string(), PathBuf::from(format!("/st/m1/{n}.raw"))))
            .collect(),
    }
}

#[test]
fn blockdev_disk_chain_is_replaced_by_a_raw_node_with_the_same_name() {
    let vm = VmDescription {
        running: true,
        argv: args(
            "qemu -M pc -m 256 -blockdev driver=file,filename=/src/a.qcow2,node-name=d0-file \
             -blockdev driver=qcow2,file=d0-file,node-name=d0,discard=unmap \
             -device virtio-blk-pci,drive=d0 -serial file:/var/log/vm/serial.log \
             -qmp unix:/run/vm.qmp,server=on,wait=off -daemonize -pidfile /run/vm.pid",
        ),
        machine: Some("pc-i440fx-10.0".into()),
        disks: vec![disk("d0", "d0", "", "/src/a.qcow2")],
    };
    let out = rewrite(&vm, &ctx(&["d0"])).expect("rewrite");
    let expected_blockdev = r#"{"discard":"unmap","driver":"raw","file":{"driver":"file","filename":"/st/m1/d0.raw"},"node-name":"d0"}"#;
    assert_eq!(
        out.argv,
        vec![
            "qemu-system-x86_64",
            "-M",
            "pc-i440fx-10.0",
            "-m",
            "256",
            "-blockdev",
            expected_blockdev,
            "-device",
            "virtio-blk-pci,drive=d0",
            "-serial",
            "file:/st/m1/serial.log",
            "-qmp",
            "unix:/st/m1/qmp.sock,server=on,wait=off",
            "-pidfile",
            "/st/m1/qemu.pid",
            "-daemonize",
            "-S",
            "-incoming",
            "defer",
        ]
    );
    assert_eq!(
        out.relocated,
        vec![(
            "/var/log/vm/serial.log".to_string(),
            PathBuf::from("/st/m1/serial.log")
        )]
    );
}

#[test]
fn drive_is_pointed_at_the_raw_image_and_machine_added() {
    let vm = VmDescription {
        running: true,
        argv: args("qemu -drive file=/src/b.img,if=none,id=drv0,format=qcow2,cache=none -device virtio-blk-pci,drive=drv0"),
        machine: Some("pc-q35-7.2".into()),
        disks: vec![disk("drv0", "#block120", "drv0", "/src/b.img")],
    };
    let out = rewrite(&vm, &ctx(&["drv0"])).expect("rewrite");
    assert_eq!(
        out.argv[1..3],
        [
            "-drive",
            "file=/st/m1/drv0.raw,if=none,id=drv0,cache=none,format=raw"
        ]
    );
    assert!(out.argv.windows(2).any(|w| w == ["-machine", "pc-q35-7.2"]));
}

#[test]
fn chardev_paths_move_and_collisions_get_unique_names() {
    let vm = VmDescription {
        running: true,
        argv: args("qemu -chardev file,id=c1,path=/a/console.log -chardev socket,id=c2,path=/b/console.log,server=on,wait=off -serial file:/c/qmp.sock"),
        machine: None,
        disks: vec![],
    };
    let out = rewrite(&vm, &ctx(&[])).expect("rewrite");
    assert_eq!(out.argv[2], "file,id=c1,path=/st/m1/console.log");
    assert_eq!(
        out.argv[4],
        "socket,id=c2,path=/st/m1/2-console.log,server=on,wait=off"
    );
    assert_eq!(
        out.argv[6], "file:/st/m1/2-qmp.sock",
        "must not take the agent's socket name"
    );
}

#[test]
fn refusals_name_the_option() {
    let cases = [
        ("qemu -serial stdio", "-serial stdio"),
        ("qemu -snapshot", "-snapshot"),
        ("qemu -hda /x.img", "-hda /x.img"),
        ("qemu -virtfs local,path=/srv", "-virtfs local,path=/srv"),
        (
            "qemu -object memory-backend-file,id=m,size=1G,mem-path=/dev/hugepages",
            "-object memory-backend-file,id=m,size=1G,mem-path=/dev/hugepages",
        ),
        (
            "qemu -blockdev driver=file,filename=/other.img,node-name=x",
            "-blockdev driver=file,filename=/other.img,node-name=x",
        ),
        (
            "qemu -drive file=/iso.iso,media=cdrom",
            "-drive file=/iso.iso,media=cdrom",
        ),
        ("qemu /bare.img", "/bare.img"),
        ("qemu -m", "-m"),
    ];
    for (argv, option) in cases {
        let vm = VmDescription {
            running: true,
            argv: args(argv),
            machine: None,
            disks: vec![],
        };
        let err = rewrite(&vm, &ctx(&[])).expect_err(argv);
        assert_eq!(err.option, option, "{argv}");
    }
}

#[test]
fn empty_cdrom_stays_and_hotplugged_disk_is_refused() {
    let vm = VmDescription {
        running: true,
        argv: args("qemu -drive if=none,id=cd0,media=cdrom"),
        machine: None,
        disks: vec![disk("hot", "hot", "", "/x.raw")],
    };
    let err = rewrite(&vm, &ctx(&["hot"])).expect_err("hot-plugged");
    assert!(err.reason.contains("hot-plugged"), "{err}");
    let vm = VmDescription {
        disks: vec![],
        ..vm
    };
    let out = rewrite(&vm, &ctx(&[])).expect("empty cdrom is fine");
    assert_eq!(out.argv[2], "if=none,id=cd0,media=cdrom");
}
