# Bake driftwarden into a Debian 12 server image with Packer.
#
# The pipeline's signing key never enters the image: it is uploaded to a RAM disk, used by
# `driftwarden-agent bake`, and shredded in the same provisioner. The signed manifest is
# downloaded and registered with the collector, so the authoritative baseline lives off the
# host. Variables: pipeline_key (path to the private key on the build machine), build_id.

packer {
  required_plugins {
    amazon = {
      source  = "github.com/hashicorp/amazon"
      version = ">= 1.3.0"
    }
  }
}

variable "build_id" { type = string }
variable "pipeline_key" { type = string }
variable "region" {
  type    = string
  default = "eu-west-1"
}

source "amazon-ebs" "debian" {
  region        = var.region
  instance_type = "t3.small"
  ssh_username  = "admin"
  ami_name      = "debian-12-server-${var.build_id}"
  source_ami_filter {
    filters     = { name = "debian-12-amd64-*", virtualization-type = "hvm" }
    owners      = ["136693071363"]
    most_recent = true
  }
  tags = { driftwarden_build_id = var.build_id }
}

build {
  sources = ["source.amazon-ebs.debian"]

  provisioner "file" {
    source      = "driftwarden_amd64.deb"
    destination = "/tmp/driftwarden_amd64.deb"
  }

  provisioner "shell" {
    inline = [
      "sudo apt-get install -y /tmp/driftwarden_amd64.deb",
      "rm /tmp/driftwarden_amd64.deb",
      # Everything else the image needs is installed here, BEFORE the bake.
    ]
  }

  provisioner "file" {
    source      = var.pipeline_key
    destination = "/dev/shm/pipeline.key"
  }

  # The last step that changes the image: bake, then destroy the key.
  provisioner "shell" {
    inline = [
      "sudo /opt/driftwarden/bin/driftwarden-agent bake --root / --policy /etc/driftwarden/policy.toml --out /var/lib/driftwarden-image/manifest.dwm --key /dev/shm/pipeline.key --build-id ${var.build_id}",
      "shred -u /dev/shm/pipeline.key",
      "sudo cloud-init clean --machine-id --logs",
    ]
  }

  provisioner "file" {
    direction   = "download"
    source      = "/var/lib/driftwarden-image/manifest.dwm"
    destination = "manifest-${var.build_id}.dwm"
  }

  post-processor "shell-local" {
    inline = ["driftwarden images register manifest-${var.build_id}.dwm"]
  }
}
