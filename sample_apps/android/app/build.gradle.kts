plugins {
    id("com.android.application")
    id("org.jetbrains.kotlin.android")
}

android {
    namespace = "org.example.imageclassifier"
    compileSdk = 35

    defaultConfig {
        applicationId = "org.example.imageclassifier"
        minSdk = 24
        targetSdk = 35
        versionCode = 1
        versionName = "1.0"
    }

    buildTypes {
        release {
            isMinifyEnabled = false
        }
    }

    compileOptions {
        sourceCompatibility = JavaVersion.VERSION_17
        targetCompatibility = JavaVersion.VERSION_17
    }

    kotlinOptions {
        jvmTarget = "17"
    }

    buildFeatures {
        viewBinding = true
    }

    // Store the model uncompressed so that MediaPipe can memory-map it from the APK.
    androidResources {
        noCompress += "tflite"
    }
}

dependencies {
    implementation("androidx.core:core-ktx:1.13.1")
    implementation("androidx.appcompat:appcompat:1.7.0")
    // The photo picker contract (PickVisualMedia).
    implementation("androidx.activity:activity-ktx:1.9.0")
    implementation("com.google.android.material:material:1.12.0")
    // lifecycleScope and coroutines to classify off the main thread.
    implementation("androidx.lifecycle:lifecycle-runtime-ktx:2.7.0")
    implementation("org.jetbrains.kotlinx:kotlinx-coroutines-android:1.8.1")
    // Reads the photo's EXIF orientation on every API level.
    implementation("androidx.exifinterface:exifinterface:1.3.7")
    // MediaPipe Tasks: reads the model's TFLite metadata (labels, normalisation). 0.10.26 and
    // later are 16 KB page-aligned, which Android 15+ devices with 16 KB pages and Google Play
    // (for apps targeting Android 15) require; the Task Library (0.4.4, its last) is not.
    implementation("com.google.mediapipe:tasks-vision:0.10.29")
}
